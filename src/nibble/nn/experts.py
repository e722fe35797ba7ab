"""Mixture-of-experts experts: every expert's projection of a layer held as one weight, computed grouped.

An :class:`ExpertLinear` is ``num_experts`` frozen linear maps ``[out, in]``: a dense ``weight``
``[experts, out, in]`` (transformers' fused layout), or one 4-bit :class:`~nibble.quant.QuantizedWeight` of
shape ``[experts * out, in]`` whose rows ``e * out : (e + 1) * out`` are expert ``e`` (NF4 blocks never span two
experts, so each expert's bytes are what bitsandbytes stores for that expert alone). An optional LoRA adds a
rank-``r`` update per expert: ``lora_A`` ``[experts, r, in]`` and ``lora_B`` ``[experts, out, r]``.

:func:`grouped_experts` sorts the token-expert assignments by expert once per layer, multiplies each active
expert's rows in one matmul per projection, and adds the outputs back into their tokens with the routing weights:
no loop over tokens and no ``[tokens, experts, ...]`` tensor. Autograd carries the backward through the same
grouped matmuls (the frozen 4-bit weights through :func:`~nibble.nn.quant_linear.frozen_matmul`). Under
``--shard-base`` the 4-bit experts are held as parameters like any 4-bit weight
(:class:`~nibble.nn.quant_linear.HeldWeight`): FSDP2 shards their rows, expert after expert.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from nibble import kernels
from nibble.errors import NibbleError
from nibble.nn.quant_linear import FrozenWeight, HeldWeight, frozen_matmul
from nibble.quant import QuantizedWeight

# The two fused projections of a layer's experts (transformers 5's parameter names).
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")


class ExpertLinear(HeldWeight):
    """``num_experts`` frozen ``[out_features, in_features]`` maps held as one weight, with optional per-expert LoRA.

    Built with an empty dense weight (on the meta device when loading); :meth:`set_weight` gives it its values.
    """

    def __init__(self, num_experts: int, out_features: int, in_features: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.weight = nn.Parameter(
            torch.empty(num_experts, out_features, in_features, dtype=dtype), requires_grad=False
        )
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.scaling = 0.0

    @property
    def held_rows(self) -> int:  # type: ignore[override]
        return self.num_experts * self.out_features

    def set_weight(self, weight: torch.Tensor | QuantizedWeight) -> None:
        """Hold ``weight``: dense ``[experts, out, in]`` (frozen), or a QuantizedWeight ``[experts * out, in]``.

        Raises:
            NibbleError: a shape that does not fit.
        """
        e, n, k = self.num_experts, self.out_features, self.in_features
        if isinstance(weight, QuantizedWeight):
            if tuple(weight.shape) != (e * n, k):
                raise NibbleError(f"4-bit experts need shape {[e * n, k]}, got {list(weight.shape)}")
            self.qweight = weight
            self.weight = None
            self.clear_cache()
            return
        if tuple(weight.shape) != (e, n, k):
            raise NibbleError(f"experts need shape {[e, n, k]}, got {list(weight.shape)}")
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.qweight = None

    @property
    def device(self) -> torch.device:
        return self.qweight.device if self.qweight is not None else self.weight.device

    def expert_weight(self, e: int) -> torch.Tensor | QuantizedWeight:
        """Expert ``e``'s frozen ``[out, in]`` weight (a view: nothing is copied or dequantized)."""
        if self.qweight is not None:
            return self.qweight.rows(e * self.out_features, (e + 1) * self.out_features)
        return self.weight[e]

    def frozen_weight(self) -> FrozenWeight:
        """The 4-bit experts as the dense-copy policy sees them (one weight, dequantized an expert at a time)."""
        e, n, k = self.num_experts, self.out_features, self.in_features
        return FrozenWeight(e * n, k, self.qweight.memory_bytes(), self.qweight.format, pieces=e)

    def _dense_copy(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The dense ``[experts, out, in]`` copy in ``dtype`` when caching is on (built on first use), else None."""
        if not self.cache_dequantized or self.qweight is None:
            return None
        if dtype not in self._cache:
            self._cache[dtype] = self.dequantize(dtype)
        return self._cache[dtype]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The frozen weights as one dense ``[experts, out, in]`` tensor."""
        if self.qweight is None:
            return self.weight.to(dtype)
        return kernels.dequantize(self.qweight, dtype).view(self.num_experts, self.out_features, self.in_features)

    def add_lora(self, rank: int, alpha: float, use_rslora: bool = False) -> None:
        """A trainable rank-``rank`` update per expert: A Kaiming-uniform (as ``nn.Linear`` draws it), B zeros.

        Raises:
            NibbleError: a rank the projection cannot hold, or a second adapter.
        """
        if self.lora_A is not None:
            raise NibbleError("these experts already have a LoRA adapter")
        if not 1 <= rank <= min(self.in_features, self.out_features):
            raise NibbleError(
                f"lora_rank {rank} does not fit experts of {self.in_features} -> {self.out_features} "
                f"(use 1..{min(self.in_features, self.out_features)})"
            )
        device = self.device
        a = torch.empty(self.num_experts, rank, self.in_features, device=device)
        for e in range(self.num_experts):
            nn.init.kaiming_uniform_(a[e], a=math.sqrt(5))
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(self.num_experts, self.out_features, rank, device=device))
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / (math.sqrt(rank) if use_rslora else rank)

    def merged_weight(self, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Expert ``e``'s dense weight ``W_e + B_e A_e scale`` ``[out, in]`` (computed in fp32, 4-bit dequantized)."""
        weight = self.expert_weight(e)
        dense = kernels.dequantize(weight, torch.float32) if isinstance(weight, QuantizedWeight) else weight.float()
        if self.lora_A is not None:
            dense = dense + (self.lora_B[e].float() @ self.lora_A[e].float()) * self.scaling
        return dense.to(dtype)

    def delta_weight(self) -> torch.Tensor:
        """``B_e @ A_e * scale`` for every expert, ``[experts, out, in]`` fp32 (what merging adds)."""
        if self.lora_A is None:
            raise NibbleError("these experts have no LoRA adapter")
        return torch.bmm(self.lora_B.float(), self.lora_A.float()) * self.scaling

    def grouped(self, x: torch.Tensor, sizes: list[int], experts: list[int]) -> torch.Tensor:
        """``x`` [M, in], rows grouped by expert (``sizes[j]`` rows for expert ``experts[j]``) -> [M, out]."""
        pieces = x.split(sizes)
        copy = self._dense_copy(x.dtype)
        lora = self.lora_A is not None
        if lora:
            # unbind once: its backward stacks the experts' gradients into one tensor (indexing per expert would
            # add a zero-filled full-size gradient per expert)
            a_parts, b_parts = self.lora_A.unbind(0), self.lora_B.unbind(0)
        weight_of = copy.__getitem__ if copy is not None else self.expert_weight
        out = []
        for e, rows in zip(experts, pieces, strict=True):
            y = frozen_matmul(rows, weight_of, e)  # [n_e, out]
            if lora:
                # scaled at rank r, where the tensor is out/r times smaller than the update
                y = y + kernels.linear(kernels.linear(rows, a_parts[e]) * self.scaling, b_parts[e])
            out.append(y)
        return torch.cat(out)

    def extra_repr(self) -> str:
        kind = self.qweight.format if self.qweight is not None else "dense"
        lora = f", lora_rank={self.rank}" if self.lora_A is not None else ""
        return f"experts={self.num_experts}, in={self.in_features}, out={self.out_features}, {kind}{lora}"


class Experts(nn.Module):
    """A layer's SwiGLU experts: ``gate_up_proj`` ``[E, 2I, H]`` (gate rows first) and ``down_proj`` ``[E, H, I]``."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_experts = num_experts
        self.fused = True  # the layout of the checkpoint the weights came from (False: one tensor per expert)
        self.gate_up_proj = ExpertLinear(num_experts, 2 * intermediate, hidden, dtype)
        self.down_proj = ExpertLinear(num_experts, hidden, intermediate, dtype)

    def forward(
        self,
        x: torch.Tensor,
        top_index: torch.Tensor,
        top_weight: torch.Tensor,
        swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """``x`` [T, H], each token's experts ``top_index`` [T, k] and their weights ``top_weight`` [T, k] -> [T, H]."""
        return grouped_experts(x, top_index, top_weight, self.gate_up_proj, self.down_proj, swiglu)


def grouped_experts(
    x: torch.Tensor,
    top_index: torch.Tensor,
    top_weight: torch.Tensor,
    gate_up: ExpertLinear,
    down: ExpertLinear,
    swiglu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``sum_j top_weight[t, j] * down_e(swiglu(gate_e(x_t), up_e(x_t)))`` with ``e = top_index[t, j]``, [T, H].

    The T*k assignments are sorted by expert (stably, so each token's experts are added in ascending order, as
    transformers' loop over experts adds them); every active expert then multiplies all its rows at once.
    """
    tokens, k = top_index.shape
    flat = top_index.reshape(-1)  # [T*k]: the expert of each assignment, token-major
    order = flat.argsort(stable=True)  # [T*k]: assignments grouped by expert
    token_of = order // k  # [T*k]: the token of each sorted assignment
    counts = torch.bincount(flat, minlength=gate_up.num_experts)  # [E]
    # The split sizes are read on the host once per layer: the one sync of the grouped loop.
    experts = counts.nonzero().squeeze(1).tolist()
    sizes = counts[experts].tolist()
    rows = x.index_select(0, token_of)  # [T*k, H]
    gate, up = gate_up.grouped(rows, sizes, experts).chunk(2, dim=-1)  # [T*k, I] each
    y = down.grouped(swiglu(gate, up), sizes, experts)  # [T*k, H]
    y = y * top_weight.reshape(-1)[order, None].to(y.dtype)
    return x.new_zeros(tokens, x.shape[1]).index_add_(0, token_of, y)
