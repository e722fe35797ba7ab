"""The decoder: embedding -> N x (RMSNorm -> mixer -> residual -> RMSNorm -> SwiGLU -> residual) -> RMSNorm -> head.

One block type serves Qwen3 (QK-norm), Qwen2 (q/k/v bias), Llama, Mistral and Qwen3.5: family differences are
fields of :class:`ModelConfig`. The mixer is attention, or for Qwen3.5's ``linear_attention`` layers Gated
DeltaNet (:mod:`nibble.model.deltanet`). Submodule names are Hugging Face's, so dense ``state_dict()`` keys
equal the checkpoint's. Each projection is an ``nn.Linear`` or a frozen ``QuantLinear``; Qwen3-MoE's sparse
layers replace the SwiGLU with :class:`~nibble.model.moe.SparseMoE`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import cache, cached_property
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from nibble import kernels
from nibble.errors import NibbleError
from nibble.model.config import ModelConfig
from nibble.model.deltanet import GatedDeltaNet
from nibble.model.moe import SparseMoE
from nibble.nn.attention import blocked_causal_attention
from nibble.nn.lora import DropoutKeys, adapters_disabled, dropout_keys

TASKS = ("causal_lm", "classify")
POOLINGS = ("last", "mean")
# Causal sequence lengths that train with blocked attention on CPU (see attend): from 768 tokens SDPA's kernel
# works in larger blocks and is as fast again.
BLOCKED_TOKENS = range(256, 768)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / rms(x) * weight`` over the last dim, computed in fp32 and returned in ``x``'s dtype."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(x.dtype)


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, computed in fp32 with an fp32 weight whatever the input dtype; with
    ``zero_centred`` (Qwen3.5) the scale is ``1 + weight``."""

    def __init__(self, dim: int, eps: float = 1e-6, zero_centred: bool = False):
        super().__init__()
        self.eps = eps
        self.zero_centred = zero_centred
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))
        self.ops = EAGER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (1 + w in fp32: a weight gathered in 16 bits by FSDP2 would round the sum to its 8 bits of mantissa)
        return self.ops.rms_norm(x, self.weight.float() + 1 if self.zero_centred else self.weight, self.eps)


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim/2] (fp32), with linear or llama3-style scaling when configured."""
    dim = config.rotary_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if not scaling:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    context = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, rotary_dim] for integer ``positions`` [T], computed in fp32 and cast to ``dtype``."""
    freqs = positions.float()[:, None] * rope_inv_freq(config, positions.device)[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, H, T, D] by position (the half-split convention of Hugging Face checkpoints)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of the positions seen so far, per attention layer, preallocated for ``max_len`` positions;
    for each Gated DeltaNet layer its conv window ``conv_windows[i]`` [B, K-1, conv channels] and recurrent
    state ``states[i]`` [B, Hv, Dk, Dv] (fp32)."""

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        full = [config.layer_type(i) == "full_attention" for i in range(config.num_hidden_layers)]
        self.keys = [torch.empty(shape, dtype=dtype, device=device) if f else None for f in full]
        self.values = [torch.empty(shape, dtype=dtype, device=device) if f else None for f in full]
        self.conv_windows: dict[int, torch.Tensor] = {}
        self.states: dict[int, torch.Tensor] = {}
        conv_channels = 2 * config.linear_key_dim + config.linear_value_dim
        for i in (i for i, f in enumerate(full) if not f):
            window = (batch_size, config.linear_conv_kernel_dim - 1, conv_channels)
            self.conv_windows[i] = torch.zeros(window, dtype=dtype, device=device)
            state = (
                batch_size,
                config.linear_num_value_heads,
                config.linear_key_head_dim,
                config.linear_value_head_dim,
            )
            self.states[i] = torch.zeros(state, dtype=torch.float32, device=device)
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new ``k``, ``v`` [B, Hkv, T, D] after the cached ones; return all of them so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise NibbleError(f"KV cache holds {self.max_len} positions; {end} were requested")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    query_len: int,
    past: int,
    sliding_window: int | None,
    device: torch.device,
) -> tuple[torch.Tensor | None, bool]:
    """``(mask, is_causal)`` for scaled_dot_product_attention.

    ``attention_mask`` [B, past + query_len] marks real tokens with 1. Without padding, a window or a
    cache offset the mask is None and SDPA's own causal path runs; otherwise a boolean mask
    [B or 1, 1, T, S] allows causal, in-window, non-pad keys. A query row left with no key at all (a
    pad query under left padding) may see itself, so its output stays finite.
    """
    total = past + query_len
    if attention_mask is not None and bool(attention_mask.all()):
        attention_mask = None
    windowed = sliding_window is not None and total > sliding_window
    if attention_mask is None and not windowed and (past == 0 or query_len == 1):
        return None, past == 0 and query_len > 1
    q_pos = torch.arange(past, total, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(total, device=device)[None, :]  # [1, S]
    allowed = k_pos <= q_pos  # [T, S]
    if windowed:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    allowed = allowed[None, None]  # [1, 1, T, S]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, None, :]  # [B, 1, T, S]
        empty = ~allowed.any(dim=-1, keepdim=True)
        allowed = allowed | (empty & (k_pos == q_pos))
    return allowed, False


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool
) -> torch.Tensor:
    """Scaled dot-product attention of q [B, Hq, Tq, D] over k, v [B, Hkv, S, D] (grouped when Hkv < Hq).

    PyTorch's SDPA picks its fused (flash) CPU kernel. Measured for fp32, forward + backward, batch x tokens
    = 1024, 1 thread, 2-core EPYC, at T = 32 / 64 / 128 / 256 / 512: flash 7.6 / 24.5 / 27.5 / 46.5 / 95.8 ms,
    SDPA's math path 12.6 / 32.0 / 36.7 / 72.9 / 131 ms, a hand-written grouped matmul + softmax 7.1 / 23.5 /
    38.1 / 70.1 / 143 ms. One case differs: training with grouped heads on CPU at ``BLOCKED_TOKENS`` causal
    tokens, where :func:`~nibble.nn.attention.blocked_causal_attention` is 1.2-1.5x faster than flash at 512
    (``benchmarks/bench_attention.py``). bf16 on a CPU without bf16 arithmetic runs on fp32 units (inputs
    rounded to bf16 first, the output rounded back): 7.2 / 19.2 / 23.4 / 52.3 / 95.8 ms there, against 24 /
    53 / 105 / 195 / 506 ms for the bf16 kernel. So does short attention on a CPU with bf16 arithmetic, where it
    is faster than the native kernel (see :data:`nibble.kernels.reference.FP32_ATTENTION_MAX_KEYS`).
    """
    device = q.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else q.dtype
    gqa = q.shape[1] != k.shape[1]
    if dtype != torch.float32 and not kernels.attention_on_fp32_units(dtype, q.device, k.shape[2]):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    q, k, v = (t.to(dtype).float() for t in (q, k, v))
    blocked = (
        device == "cpu"
        and gqa
        and is_causal
        and mask is None
        and q.shape[2] == k.shape[2]
        and q.shape[2] in BLOCKED_TOKENS
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in (q, k, v))
    )
    with torch.autocast(device, enabled=False):
        if blocked:
            y = blocked_causal_attention(q, k, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=gqa)
    return y.to(dtype)


class TokenLayout:
    """Where the real tokens of a [B, T] batch sit, so that token-wise work skips the padding.

    Embeddings, norms, the seven projections, SwiGLU and LoRA run on the N real tokens as packed rows
    [N, ...]; attention runs per sequence on a padded [B, heads, T, D] layout (:meth:`to_padded` scatters
    the packed rows there, :meth:`from_padded` gathers them back). Padding costs the token-wise work
    nothing; real short texts are ~40% padding when batched by 16.

    Built by :meth:`DecoderModel.layout`, from ``token_index`` where the batch carries it (the flat positions of its
    real tokens under right padding, found when it was collated: see :func:`nibble.data.batching.pad_batch`), which
    reads nothing back from the device; else from ``attention_mask``, which reads it (inference on a caller's
    tensors). ``index`` [N] holds the flat positions ``b * T + t`` of the real tokens row after row (None when every
    position is real); ``positions`` [N] their RoPE positions;
    ``cos``/``sin`` [N, 1, head_dim]; ``mask``/``is_causal`` what SDPA gets for all queries. For pooling,
    ``last`` [B] indexes each row's last real token among the N and ``last_mask`` [B, 1, 1, S] holds the
    keys it may attend to.
    """

    def __init__(
        self,
        config: ModelConfig,
        attention_mask: torch.Tensor | None,
        batch: int,
        seq: int,
        past: int,
        device: torch.device,
        dtype: torch.dtype,
        token_index: torch.Tensor | None = None,
    ):
        self.batch, self.seq = batch, seq
        self.index: torch.Tensor | None = None
        self.lengths = torch.full((batch,), seq, dtype=torch.long, device=device)
        keys_mask = attention_mask
        if token_index is not None and past == 0:
            # Right padding: a real query's causal keys are all real, so no padding mask is needed.
            keys_mask = None
            if token_index.shape[0] != batch * seq:
                self.index = token_index
                rows = token_index // seq
                self.lengths = torch.zeros_like(self.lengths).index_add_(0, rows, torch.ones_like(rows))
        elif attention_mask is not None and past == 0:
            real = attention_mask.bool()
            self.lengths = real.sum(dim=1)
            if not bool(real.all()):
                self.index = real.reshape(-1).nonzero().squeeze(1)  # [N]
                steps = torch.arange(seq, device=device)
                if bool((real == (steps[None, :] < self.lengths[:, None])).all()):
                    # Right padding: a real query's causal keys are all real, so no padding mask is needed.
                    keys_mask = None
        flat = self.index if self.index is not None else torch.arange(batch * seq, device=device)
        self.rows = flat // seq  # [N]: the batch row of each packed token
        self.positions = flat % seq + past  # [N]
        cos, sin = rope_cos_sin(config, self.positions, dtype)  # [N, D]
        self.cos, self.sin = cos[:, None], sin[:, None]  # [N, 1, D]
        self.mask, self.is_causal = build_attention_mask(keys_mask, seq, past, config.sliding_window, device)
        self.last = self.lengths.cumsum(0) - 1  # [B]
        self._keys_mask, self._window = keys_mask, config.sliding_window
        self.dropout: DropoutKeys | None = None  # set by a training forward (see DecoderModel.packed_hidden_states)

    @cached_property
    def cu_seqlens(self) -> torch.Tensor:
        """[B + 1]: where each row's real tokens start among the N packed ones (and N at the end)."""
        return F.pad(self.lengths.cumsum(0), (1, 0))

    @cached_property
    def sequence_positions(self) -> torch.Tensor:
        """[N]: each packed token's index among its row's real tokens (0 at the first real token)."""
        n = self.batch * self.seq if self.index is None else self.index.shape[0]
        return torch.arange(n, device=self.lengths.device) - self.cu_seqlens[self.rows]

    def last_mask(self) -> torch.Tensor:
        """[B, 1, 1, T] bool: the keys each row's last real token attends to (causal, in-window, non-pad).

        Only without a KV cache (key positions 0..T-1)."""
        k_pos = torch.arange(self.seq, device=self.last.device)[None, :]  # [1, T]
        q_pos = self.positions[self.last][:, None]  # [B, 1]
        allowed = k_pos <= q_pos
        if self._window is not None:
            allowed = allowed & (k_pos > q_pos - self._window)
        if self._keys_mask is not None:
            allowed = allowed & self._keys_mask.bool()
        return allowed[:, None, None, :]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, ...] -> [N, ...]: the real positions only."""
        flat = x.reshape(self.batch * self.seq, *x.shape[2:])
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, ...] -> [B, T, ...], zeros at the pad positions."""
        if self.index is not None:
            x = x.new_zeros(self.batch * self.seq, *x.shape[1:]).index_copy(0, self.index, x)
        return x.view(self.batch, self.seq, *x.shape[1:])

    def to_padded(self, x: torch.Tensor) -> torch.Tensor:
        """[N, heads, D] -> [B, heads, T, D] for attention (zeros at the pad positions)."""
        return self.unpack(x).transpose(1, 2)

    def from_padded(self, y: torch.Tensor) -> torch.Tensor:
        """[B, heads, T, D] -> [N, heads * D]."""
        b, h, t, d = y.shape
        return self.pack(y.transpose(1, 2).reshape(b, t, h * d))


class Attention(nn.Module):
    """Grouped-query attention with RoPE, optional q/k/v bias and optional per-head QK RMSNorm; for Qwen3.5 an
    output gate (``q_proj`` yields each head's query then its gate; the output is multiplied by sigmoid(gate))
    and RoPE on the first ``rotary_dim`` channels of each head only."""

    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        h, qd, kvd = config.hidden_size, config.q_dim, config.kv_dim
        self.gated = config.attn_output_gate
        self.rotary_dim = config.rotary_dim
        self.q_proj = nn.Linear(h, 2 * qd if self.gated else qd, bias=config.attention_bias, dtype=dtype)
        self.k_proj = nn.Linear(h, kvd, bias=config.attention_bias, dtype=dtype)
        self.v_proj = nn.Linear(h, kvd, bias=config.attention_bias, dtype=dtype)
        self.o_proj = nn.Linear(qd, h, bias=config.attention_out_bias, dtype=dtype)
        self.qk_norm = config.qk_norm
        self.ops = EAGER
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, config.zero_centred_norm)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, config.zero_centred_norm)

    def forward(
        self, x: torch.Tensor, layout: TokenLayout, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """[N, hidden] packed tokens -> [N, hidden]; with ``last_only``, [B, hidden] for each row's last token."""
        n = x.shape[0]
        queries = x[layout.last] if last_only else x
        q = self.q_proj(queries)
        if self.gated:
            q, gate = q.view(-1, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)  # [N or B, Hq, D] each
            gate = torch.sigmoid(gate.reshape(-1, self.num_heads * self.head_dim))  # [N or B, Hq * D]
        else:
            q = q.view(-1, self.num_heads, self.head_dim)  # [N or B, Hq, D]
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)  # [N, Hkv, D]
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)  # [N, Hkv, D]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (layout.cos[layout.last], layout.sin[layout.last]) if last_only else (layout.cos, layout.sin)
        q, k = self._rope(q, cos, sin), self._rope(k, layout.cos, layout.sin)
        k, v = layout.to_padded(k), layout.to_padded(v)  # [B, Hkv, T, D]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, past + T, D]
        if last_only:
            y = attend(q[:, :, None], k, v, layout.last_mask(), False)  # [B, Hq, 1, D]
            y = y.reshape(layout.batch, self.num_heads * self.head_dim)  # [B, Hq * D]
        else:
            y = attend(layout.to_padded(q), k, v, layout.mask, layout.is_causal)  # [B, Hq, T, D]
            y = layout.from_padded(y)  # [N, Hq * D]
        return self.o_proj(y * gate if self.gated else y)  # [N or B, hidden]

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on the first ``rotary_dim`` channels of each head; the rest pass unchanged."""
        if self.rotary_dim == self.head_dim:
            return self.ops.rope(x, cos, sin)
        r = self.rotary_dim
        return torch.cat((self.ops.rope(x[..., :r], cos, sin), x[..., r:]), dim=-1)


class _SwiGLU(torch.autograd.Function):
    """``silu(g) * u`` keeping only ``g`` and ``u`` for backward (silu is recomputed there): a third less
    activation memory in every MLP than autograd's three saved tensors."""

    @staticmethod
    def forward(ctx, g, u):  # type: ignore[override]
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        g, u = ctx.saved_tensors
        dtype = g.dtype
        g, u, grad = g.float(), u.float(), grad.float()  # fp32 math, as autograd's own kernels do for bf16
        sig = torch.sigmoid(g)
        grad_g = grad * u * (sig * (1 + g * (1 - sig)))  # d silu(g)/dg = sig * (1 + g * (1 - sig))
        return grad_g.to(dtype), (grad * g * sig).to(dtype)


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` (same dtype rules as the plain expression, also under autocast)."""
    if torch.is_grad_enabled() and (g.requires_grad or u.requires_grad):
        return _SwiGLU.apply(g, u)
    return _silu_mul(g, u)


def _silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The plain expression, which :func:`fused_elementwise` compiles (dynamo would have to trace ``_SwiGLU``'s
    hand-written backward)."""
    return F.silu(g) * u


class Elementwise(NamedTuple):
    """The elementwise work of a block, as RMSNorm, attention and MLP modules call it (their ``ops``)."""

    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    rope: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


EAGER = Elementwise(rms_norm, apply_rope, swiglu)


@cache
def fused_elementwise() -> Elementwise:
    """The same functions through ``torch.compile`` (inductor, shapes dynamic): each becomes one fused kernel
    forward and one backward instead of 4-8 passes over the activations. Kernels are built on first use of
    each dtype and grad mode, and inductor keeps them on disk for later runs."""
    fuse = lambda fn: torch.compile(fn, dynamic=True, fullgraph=True)  # noqa: E731
    return Elementwise(fuse(rms_norm), fuse(apply_rope), fuse(_silu_mul))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, ``width`` wide (the config's ``intermediate_size`` unless given: a
    shared expert's is its own)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32, width: int | None = None):
        super().__init__()
        h, i, bias = config.hidden_size, width or config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias, dtype=dtype)
        self.up_proj = nn.Linear(h, i, bias=bias, dtype=dtype)
        self.down_proj = nn.Linear(i, h, bias=bias, dtype=dtype)
        self.ops = EAGER

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    """One block: pre-norm mixer (``self_attn``, or ``linear_attn`` for a ``linear_attention`` layer) and
    pre-norm SwiGLU, each with a residual."""

    def __init__(self, config: ModelConfig, layer_idx: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.linear = config.layer_type(layer_idx) == "linear_attention"
        if self.linear:
            self.linear_attn = GatedDeltaNet(config, layer_idx, dtype)
        else:
            self.self_attn = Attention(config, layer_idx, dtype)
        moe = config.moe
        if moe is not None and moe.is_sparse(layer_idx):
            width = moe.shared_expert_intermediate_size
            self.mlp = SparseMoE(config, EAGER, dtype, MLP(config, dtype, width) if width else None)
        else:
            self.mlp = MLP(config, dtype)
        norm = config.zero_centred_norm
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, norm)

    def forward(
        self, x: torch.Tensor, layout: TokenLayout, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """[N, hidden] -> [N, hidden], or [B, hidden] at each row's last token with ``last_only`` (the keys
        and values still come from every token; the rest of the block runs for B rows only)."""
        mixer = self.linear_attn if self.linear else self.self_attn
        with dropout_keys(layout.dropout):
            h = mixer(self.input_layernorm(x), layout, cache, last_only)
            x = (x[layout.last] if last_only else x) + h
            return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embedding, blocks and final norm (Hugging Face's ``model.`` prefix)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        weight = torch.empty(config.vocab_size, config.hidden_size, dtype=dtype)
        # Skip the random init on the meta device: normal_ there costs a 1.7 s import of torch._dynamo.
        if weight.device.type != "meta":
            nn.init.normal_(weight, std=config.initializer_range)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, _weight=weight)
        self.layers = nn.ModuleList(DecoderLayer(config, i, dtype) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.zero_centred_norm)


class DecoderModel(nn.Module):
    """A decoder with an LM head (``task="causal_lm"``) or a classifier head ``score`` (``task="classify"``).

    ``model(input_ids [B, T], attention_mask [B, T] | None, token_index=...)`` returns logits [B, T, vocab] or
    [B, num_labels]. The classifier pools the final-normed hidden states first (the last real token per
    row, or the masked mean with ``pooling="mean"``) and then applies ``score``; with ``"last"`` the final
    block computes its queries, MLP and norm at the last tokens only.
    """

    def __init__(
        self,
        config: ModelConfig,
        task: str = "causal_lm",
        num_labels: int | None = None,
        pooling: str = "last",
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if task not in TASKS:
            raise NibbleError(f"task '{task}' is not supported; use one of {TASKS}")
        if pooling not in POOLINGS:
            raise NibbleError(f"pooling '{pooling}' is not supported; use one of {POOLINGS}")
        self.config = config
        self.task = task
        self.pooling = pooling
        self.dtype = dtype
        self.gradient_checkpointing = False
        self.model = Backbone(config, dtype)
        if task == "causal_lm":
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, dtype=dtype)
            if config.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        else:
            num_labels = num_labels or config.num_labels
            if not num_labels:
                raise NibbleError("a classify model needs num_labels (none given and none in config.json)")
            self.score = nn.Linear(config.hidden_size, num_labels, bias=False, dtype=dtype)
        self.num_labels = num_labels if task == "classify" else None

    def layout(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        token_index: torch.Tensor | None = None,
    ) -> TokenLayout:
        """The :class:`TokenLayout` of a batch ``input_ids`` [B, T] (after the ``cache``'s positions); with the batch's
        ``token_index`` (right padding) it never reads the device back."""
        if input_ids.dim() != 2:
            raise NibbleError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        dtype = self.model.embed_tokens.weight.dtype  # RoPE tables in the hidden states' dtype
        return TokenLayout(self.config, attention_mask, b, t, past, input_ids.device, dtype, token_index)

    def packed_hidden_states(
        self, input_ids: torch.Tensor, layout: TokenLayout, cache: KVCache | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """Final-normed hidden states of the real tokens, [N, hidden] in ``layout`` order; with ``last_only``
        [B, hidden] at each row's last real token, the final block computed there only."""
        ids = layout.pack(input_ids)
        x = self.model.embed_tokens(ids)  # [N, H]
        if self.training and cache is None:
            # LoRA dropout keyed by each sequence's tokens, so its masks do not depend on the batch layout
            layout.dropout = DropoutKeys(ids, layout.rows, layout.sequence_positions, layout.last)
        recompute = self.gradient_checkpointing and cache is None and torch.is_grad_enabled()
        last = len(self.model.layers) - 1
        for i, layer in enumerate(self.model.layers):
            only = last_only and i == last
            if recompute:
                x = checkpoint(layer, x, layout, None, only, use_reentrant=False)
            else:
                x = layer(x, layout, cache, only)
        if cache is not None:
            cache.length += layout.seq
        return self.model.norm(x)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states [B, T, hidden] for ``input_ids`` [B, T] (zeros at pad positions); pass a
        collated batch's ``token_index`` too (see :meth:`layout`)."""
        layout = self.layout(input_ids, attention_mask, cache, token_index)
        return layout.unpack(self.packed_hidden_states(input_ids, layout, cache))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        layout = self.layout(input_ids, attention_mask, cache, token_index)
        if self.task == "causal_lm":
            return self.lm_head(layout.unpack(self.packed_hidden_states(input_ids, layout, cache)))  # [B, T, V]
        if self.pooling == "last":
            pooled = self.packed_hidden_states(input_ids, layout, cache, last_only=True)  # [B, H]
        else:
            hidden = self.packed_hidden_states(input_ids, layout, cache)  # [N, H]
            sums = hidden.new_zeros(layout.batch, hidden.shape[1], dtype=torch.float32)
            sums.index_add_(0, layout.rows, hidden.float())  # [B, H]
            pooled = (sums / layout.lengths.clamp(min=1)[:, None]).to(hidden.dtype)
        return self.score(pooled)  # [B, num_labels]

    def adapters_disabled(self) -> AbstractContextManager[None]:
        """``with model.adapters_disabled():`` the model computes as its base, LoRA adapters off (see
        :func:`nibble.nn.lora.adapters_disabled`)."""
        return adapters_disabled(self)

    def use_elementwise(self, ops: Elementwise) -> None:
        """Run every norm, RoPE and SwiGLU through ``ops`` (:data:`EAGER` or :func:`fused_elementwise`)."""
        for module in self.modules():
            if isinstance(module, (RMSNorm, Attention, MLP, SparseMoE)):
                module.ops = ops

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache for up to ``max_len`` positions, on this model's device and dtype."""
        device = self.model.embed_tokens.weight.device
        return KVCache(self.config, batch_size, max_len, self.dtype, device)
