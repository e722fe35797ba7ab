"""Gated DeltaNet: the linear-attention mixer of Qwen3.5's (and Qwen3-Next's) ``linear_attention`` layers.

``in_proj_qkv`` -> depthwise causal conv1d (kernel ``linear_conv_kernel_dim``, no bias) + SiLU -> split into
q, k [N, Hk, Dk] (L2-normalized) and v [N, Hv, Dv]; ``beta = sigmoid(in_proj_b x)``,
``g = -exp(A_log) * softplus(in_proj_a x + dt_bias)``; the gated delta rule (:mod:`nibble.nn.delta_rule`);
``norm(o) * silu(in_proj_z x)`` per value head (a plain-weight RMSNorm, unlike the model's zero-centred ones);
``out_proj``. Names are Hugging Face's (``linear_attn.in_proj_qkv`` ...), so state-dict keys equal the
checkpoint's. Qwen3-Next fuses the four input projections into two (``in_proj_qkvz``, ``in_proj_ba``) whose rows
come grouped by key head: per key head its q, k, then the v and z of the value heads it serves (b and a the same
way); :meth:`GatedDeltaNet.project` reorders them into the layout above, after which both families are one.

Tokens arrive packed as in the rest of the model ([N, ...], the rows of a batch one after another without
padding): the conv window and the recurrent state restart at every row, so rows never see each other. With a
cache (generation) the rows are unpadded and continue from the cached conv window and state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from nibble.errors import NibbleError
from nibble.model.config import ModelConfig
from nibble.nn.delta_rule import chunk_gated_delta_rule, gated_delta_step

if TYPE_CHECKING:
    from nibble.model.model import KVCache, TokenLayout


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim, in fp32 (as transformers and fla compute it)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, *, positions: torch.Tensor | None = None, window: torch.Tensor | None = None
) -> torch.Tensor:
    """Depthwise causal convolution of ``x`` [B, T, C] with ``weight`` [C, K] (no bias, no activation).

    Output t is ``sum_j weight[:, j] * x[t - (K-1) + j]``. Before the first token come ``window`` [B, K-1, C]
    (the cached inputs of earlier steps) or zeros; with ``positions`` [T] (each token's index within its own
    sequence, for sequences packed end to end) a tap that would reach back past its sequence's start reads zero.
    """
    taps = weight.shape[1]
    t = x.shape[1]
    if window is None:
        padded = F.pad(x, (0, 0, taps - 1, 0))  # [B, K-1+T, C]
    else:
        padded = torch.cat((window.to(x.dtype), x), dim=1)
    weight = weight.to(x.dtype)
    out = padded[:, taps - 1 :] * weight[:, taps - 1]
    for back in range(1, taps):  # the tap reading `back` tokens earlier
        tap = padded[:, taps - 1 - back : taps - 1 - back + t] * weight[:, taps - 1 - back]
        if positions is not None:
            tap = tap * (positions >= back).to(x.dtype)[:, None]
        out = out + tap
    return out


class GatedRMSNorm(nn.Module):
    """``weight * x / rms(x) * silu(gate)`` over the last dim (fp32 arithmetic, ``x``'s dtype out)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight.float() * h.to(x.dtype).float()  # the normed input rounds to x's dtype first, as in HF
        return (h * F.silu(gate.float())).to(x.dtype)


class GatedDeltaNet(nn.Module):
    """The linear-attention mixer (see the module docstring)."""

    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.layer_idx = layer_idx
        h = config.hidden_size
        self.num_k_heads, self.num_v_heads = config.linear_num_key_heads, config.linear_num_value_heads
        self.head_k_dim, self.head_v_dim = config.linear_key_head_dim, config.linear_value_head_dim
        self.key_dim, self.value_dim = config.linear_key_dim, config.linear_value_dim
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.fused = config.linear_fused_projections
        if self.fused:
            self.in_proj_qkvz = nn.Linear(h, self.conv_dim + self.value_dim, bias=False, dtype=dtype)
            self.in_proj_ba = nn.Linear(h, 2 * self.num_v_heads, bias=False, dtype=dtype)
        else:
            self.in_proj_qkv = nn.Linear(h, self.conv_dim, bias=False, dtype=dtype)
            self.in_proj_z = nn.Linear(h, self.value_dim, bias=False, dtype=dtype)
            self.in_proj_b = nn.Linear(h, self.num_v_heads, bias=False, dtype=dtype)
            self.in_proj_a = nn.Linear(h, self.num_v_heads, bias=False, dtype=dtype)
        kernel = config.linear_conv_kernel_dim
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel, groups=self.conv_dim, bias=False, dtype=dtype)
        self.dt_bias = nn.Parameter(torch.ones(self.num_v_heads, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.zeros(self.num_v_heads, dtype=torch.float32))
        self.norm = GatedRMSNorm(self.head_v_dim, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, h, bias=False, dtype=dtype)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` [N, hidden] -> the conv's input q|k|v [N, 2 Kd + Vd], z [N, Vd], b and a [N, Hv]."""
        if not self.fused:
            return self.in_proj_qkv(x), self.in_proj_z(x), self.in_proj_b(x), self.in_proj_a(x)
        n, groups, per_group = x.shape[0], self.num_k_heads, self.num_v_heads // self.num_k_heads
        qkvz = self.in_proj_qkvz(x).view(n, groups, -1)  # [N, Hk, 2 Dk + 2 r Dv]
        sizes = (self.head_k_dim, self.head_k_dim, per_group * self.head_v_dim, per_group * self.head_v_dim)
        q, k, v, z = (part.reshape(n, -1) for part in qkvz.split(sizes, dim=-1))
        b, a = (part.reshape(n, -1) for part in self.in_proj_ba(x).view(n, groups, -1).split(per_group, dim=-1))
        return torch.cat((q, k, v), dim=-1), z, b, a

    def forward(
        self, x: torch.Tensor, layout: TokenLayout, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """[N, hidden] packed tokens -> [N, hidden]; with ``last_only``, [B, hidden] for each row's last token."""
        n = x.shape[0]
        mixed, z, b, a = self.project(x)  # [N, 2 Kd + Vd], [N, Vd], [N, Hv], [N, Hv]
        z = z.view(n, self.num_v_heads, self.head_v_dim)  # [N, Hv, Dv]
        beta = torch.sigmoid(b.float())  # [N, Hv]
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias.float())  # [N, Hv]
        weight = self.conv1d.weight[:, 0]  # [C, K]
        if cache is None:
            mixed = causal_conv(mixed[None], weight, positions=layout.sequence_positions)[0]
            rows = (1, n)  # the sequences end to end in one row, split by cu_seqlens
        else:
            if layout.index is not None:
                raise NibbleError("a recurrent cache takes unpadded rows; pass no padding with a cache")
            rows = (layout.batch, layout.seq)
            inputs = mixed.view(*rows, -1)  # [B, T, C]
            window = cache.conv_windows[self.layer_idx]  # [B, K-1, C]
            mixed = causal_conv(inputs, weight, window=window).view(n, -1)
            cache.conv_windows[self.layer_idx] = torch.cat((window, inputs.to(window.dtype)), 1)[:, -window.shape[1] :]
        mixed = F.silu(mixed)
        q, k, v = mixed.split((self.key_dim, self.key_dim, self.value_dim), dim=-1)
        q = l2_normalize(q.reshape(*rows, self.num_k_heads, self.head_k_dim))  # [1 or B, N or T, Hk, Dk]
        k = l2_normalize(k.reshape(*rows, self.num_k_heads, self.head_k_dim))
        v = v.reshape(*rows, self.num_v_heads, self.head_v_dim)  # [1 or B, N or T, Hv, Dv]
        g, beta = g.view(*rows, -1), beta.view(*rows, -1)  # [1 or B, N or T, Hv]
        if cache is None:
            o, _ = chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens=layout.cu_seqlens)
        elif layout.seq == 1:
            state = cache.states[self.layer_idx]
            o, cache.states[self.layer_idx] = gated_delta_step(
                q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, self.head_k_dim**-0.5
            )
        else:
            state = cache.states[self.layer_idx]
            o, cache.states[self.layer_idx] = chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state)
        o = self.norm(o.reshape(n, self.num_v_heads, self.head_v_dim), z).reshape(n, self.value_dim)  # [N, Vd]
        if last_only:
            o = o[layout.last]  # [B, Vd]
        return self.out_proj(o)
