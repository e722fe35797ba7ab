"""QuantLinear: a frozen linear layer whose weight is stored in 4 bits, and the policy for its dense copies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from nibble import kernels
from nibble.devices import memory_available_bytes
from nibble.errors import NibbleError
from nibble.quant import QuantizedWeight, QuantSpec, quantize


class _QuantMatmul(torch.autograd.Function):
    """y = x @ W^T + b with W frozen: backward returns only grad_x, recomputed from the 4-bit W."""

    @staticmethod
    def forward(ctx, x, bias, layer):  # type: ignore[override]
        ctx.layer = layer
        cached = layer.cached_weight(x.dtype)
        if cached is not None:
            return kernels.linear(x, cached, bias)
        return kernels.matmul(x, layer.qweight, bias)

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None
        layer = ctx.layer
        cached = layer.cached_weight(grad_y.dtype)
        if cached is not None:
            grad_x = kernels.linear(grad_y, cached.T)  # grad_y @ W
        else:
            grad_x = kernels.matmul_grad_input(grad_y, layer.qweight)
        return grad_x, None, None


class _FrozenQuantMatmul(torch.autograd.Function):
    """``x @ W^T`` for the 4-bit rows ``weight_of(index)`` (one expert's): backward gives grad_x only, with the
    rows built again (under FSDP2 the layer's bytes are gathered again for the backward)."""

    @staticmethod
    def forward(ctx, x, weight_of, index):  # type: ignore[override]
        ctx.weight_of, ctx.index = weight_of, index
        return kernels.matmul(x, weight_of(index))

    @staticmethod
    def backward(ctx, grad_y):  # type: ignore[override]
        return kernels.matmul_grad_input(grad_y, ctx.weight_of(ctx.index)), None, None


def frozen_matmul(
    x: torch.Tensor, weight_of: Callable[[int], torch.Tensor | QuantizedWeight], index: int
) -> torch.Tensor:
    """``x [M, K] @ W[N, K]^T -> [M, N]`` for the frozen dense or 4-bit ``W = weight_of(index)``, differentiable in
    ``x`` only."""
    weight = weight_of(index)
    if isinstance(weight, QuantizedWeight):
        return _FrozenQuantMatmul.apply(x, weight_of, index)
    return kernels.linear(x, weight)


# The name prefix of the frozen parameters a layer holds its 4-bit tensors in (see HeldWeight.hold_as_parameters).
HELD = "held_"


class HeldWeight(nn.Module):
    """A module with a frozen 4-bit weight (``qweight``, or None) that it can hold as uint8 parameters for FSDP2 to
    shard by rows (:meth:`hold_as_parameters`). Subclasses set ``held_rows`` (the weight's rows, which a shard holds
    whole) and keep their dense-copy cache in ``_cache``."""

    held_rows: int

    def __init__(self) -> None:
        super().__init__()
        self._held: tuple[str, ...] = ()  # the 4-bit tensors held as parameters, by name
        self._weight: QuantizedWeight | None = None
        self._cache: dict[torch.dtype, torch.Tensor] = {}
        self.cache_dequantized = False

    @property
    def qweight(self) -> QuantizedWeight | None:
        """The 4-bit weight. Held as parameters (see :meth:`hold_as_parameters`), it is built over them at each use,
        so under FSDP2 it is the gathered weight inside a forward or backward."""
        if not self._held:
            return self._weight
        like = self._weight.tensors()  # meta tensors: each one's dtype and shape
        return self._weight.with_tensors(
            {name: getattr(self, HELD + name).view(like[name].dtype).view(like[name].shape) for name in self._held}
        )

    @qweight.setter
    def qweight(self, value: QuantizedWeight | None) -> None:
        if self._held:
            raise NibbleError("this layer holds its 4-bit tensors as parameters; its weight cannot be replaced")
        self._weight = value

    def hold_as_parameters(self) -> None:
        """Hold the 4-bit tensors as frozen uint8 parameters, rows first, for FSDP2 to shard (nothing to do for a
        dense weight).

        Each tensor whose size is a multiple of ``held_rows`` becomes ``[held_rows, bytes per row]`` (NF4's packed
        bytes and block scales when the row length is a multiple of the block size, INT4's packed bytes and group
        scales, GGUF's rows of blocks), so a shard holds whole rows of the weight and their whole blocks; the
        others (double quantization's nested scales) ``[values, bytes per value]``. Bytes, because nothing may
        cast them: a mixed-precision policy and ``Module.to(dtype)`` leave non-float parameters alone. The
        dense-copy cache is off from then on (each copy would be a whole weight on every rank).
        """
        if self._held or self._weight is None:
            return
        self.cache_dequantized = False
        self.clear_cache()
        tensors = self._weight.tensors()
        for name, t in tensors.items():
            rows = self.held_rows if t.numel() % self.held_rows == 0 else t.numel()
            held = t.contiguous().reshape(rows, -1).view(torch.uint8)
            self.register_parameter(HELD + name, nn.Parameter(held, requires_grad=False))
        self._held = tuple(tensors)
        self._weight = self._weight.map_tensors(lambda t: t.to("meta"))  # the format, without a second copy

    def clear_cache(self) -> None:
        self._cache.clear()

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Module.to(dtype) would cast the fp32 block scales; a 4-bit weight only ever changes device (held as
        # uint8 parameters, it moves with them and is never cast).
        if not self._held and self._weight is not None:
            target = fn(torch.empty(0, dtype=torch.uint8, device=self._weight.device)).device
            if target != self._weight.device:
                self._weight = self._weight.to(target)
                self.clear_cache()
        return super()._apply(fn, recurse)


class QuantLinear(HeldWeight):
    """A frozen ``y = x W^T + b`` with ``W`` stored as NF4 or INT4.

    The weight never receives a gradient; the input does (LoRA adapters above need it). The backward
    recomputes ``grad_y @ W`` from the 4-bit weight rather than keeping a dense copy alive, unless the
    optional dequantized-weight cache is on (``cache_dequantized=True``), which trades memory for speed.
    """

    def __init__(self, qweight: QuantizedWeight, bias: torch.Tensor | None = None, cache_dequantized: bool = False):
        super().__init__()
        if len(qweight.shape) != 2:
            raise NibbleError(f"QuantLinear needs a 2-D weight [out, in], got shape {tuple(qweight.shape)}")
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise NibbleError(f"bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.cache_dequantized = cache_dequantized

    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        spec: QuantSpec | str = "nf4",
        *,
        cache_dequantized: bool = False,
    ) -> QuantLinear:
        """Quantize a dense ``[out, in]`` weight as ``spec`` says (and keep ``bias`` as it is)."""
        if weight.dim() != 2:
            raise NibbleError(f"QuantLinear needs a 2-D weight [out, in], got shape {tuple(weight.shape)}")
        return cls(quantize(weight, spec), bias, cache_dequantized)

    @property
    def held_rows(self) -> int:  # type: ignore[override]
        return self.out_features

    @property
    def format(self) -> str:
        return self._weight.format

    def cached_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The dequantized weight in ``dtype`` when caching is on (built on first use), else None."""
        if not self.cache_dequantized or self._held:
            return None
        if dtype not in self._cache:
            self._cache[dtype] = kernels.dequantize(self.qweight, dtype)
        return self._cache[dtype]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return kernels.dequantize(self.qweight, dtype)

    def frozen_weight(self) -> FrozenWeight:
        return FrozenWeight(self.out_features, self.in_features, self.qweight.memory_bytes(), self.format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise NibbleError(f"QuantLinear expects inputs with {self.in_features} features, got {x.shape[-1]}")
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        with torch.autocast(x.device.type, enabled=False):
            y = _QuantMatmul.apply(x2d, self.bias, self)
        return y.view(*lead, self.out_features)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self.qweight.state_dict(prefix + "weight"))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
            f"bias={self.bias is not None}, cache_dequantized={self.cache_dequantized}"
        )


# Peak bytes per weight element that the torch reference's dequantize + matmul (forward and grad-input) adds
# while it runs, measured with VmHWM on a 4096x4096 weight (fp32 and bf16 compute): NF4 5-6 (int32 byte-pair
# indices and fp32 values, then the cast), INT4 8-10 (int8 codes, fp32 groups and their scaled product); GGUF
# blocks, the worst type (2048x2048, fp32): Q5_1 16, Q4_0 13, Q6_K 10, Q8_0 9, Q4_K 4.
DEQUANTIZE_WORKSPACE = {"nf4": 6, "int4": 10, "gguf": 16}


@dataclass(frozen=True)
class FrozenWeight:
    """What the dense-copy policy needs to know of one frozen 4-bit layer (``pieces``: the parts it dequantizes one
    at a time without a copy, a layer's experts)."""

    out_features: int
    in_features: int
    packed_bytes: int  # the 4-bit weight with its scales
    format: str
    pieces: int = 1

    def dense_bytes(self, dtype: torch.dtype) -> int:
        return self.out_features * self.in_features * dtype.itemsize

    def workspace_bytes(self) -> int:
        return self.out_features * self.in_features * DEQUANTIZE_WORKSPACE[self.format] // self.pieces


def frozen_layers(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` holding a frozen 4-bit weight that may keep a dense copy, in model order: every
    QuantLinear, and every layer's experts (anything with ``frozen_weight()`` and a ``qweight``)."""
    return [m for m in model.modules() if hasattr(m, "frozen_weight") and getattr(m, "qweight", None) is not None]


def frozen_weights(model: nn.Module) -> list[FrozenWeight]:
    """The frozen 4-bit layers of ``model`` in model order."""
    return [m.frozen_weight() for m in frozen_layers(model)]


def auto_cache_budget(weights: Sequence[FrozenWeight], dtype: torch.dtype, device: torch.device) -> int:
    """The default budget for dense ``dtype`` copies of the frozen 4-bit ``weights`` on ``device``.

    Accelerators: 0 (the 4-bit memory saving is the point, and the fused kernels make the copies needless).
    CPU: what the same weights stored dense in ``dtype`` would take (the ``lora`` method) minus what they take in
    4 bits and minus the dequantize workspace of the largest one (which a layer without a copy needs in every
    step), so that a 4-bit base with its copies never needs more memory than the dense base; and at most half
    the available memory.
    """
    if device.type != "cpu" or not weights:
        return 0
    dense = sum(w.dense_bytes(dtype) for w in weights)
    packed = sum(w.packed_bytes for w in weights)
    budget = dense - packed - max(w.workspace_bytes() for w in weights)
    available = memory_available_bytes()
    if available is not None:
        budget = min(budget, available // 2)
    return max(budget, 0)


def plan_copies(weights: Sequence[FrozenWeight], budget_bytes: int, dtype: torch.dtype) -> list[bool]:
    """Which weights get a dense copy within ``budget_bytes``: each in model order that still fits."""
    chosen, used = [], 0
    for w in weights:
        size = w.dense_bytes(dtype)
        chosen.append(used + size <= budget_bytes)
        used += size if chosen[-1] else 0
    return chosen


def cache_budget_bytes(model: nn.Module, dtype: torch.dtype, budget_mb: int | None = None) -> int:
    """Bytes for dense ``dtype`` copies of ``model``'s frozen 4-bit weights: ``budget_mb`` MiB when given, else
    :func:`auto_cache_budget` on the device the weights live on."""
    if budget_mb is not None:
        return budget_mb * 2**20
    layers = frozen_layers(model)
    if not layers:
        return 0
    return auto_cache_budget(frozen_weights(model), dtype, layers[0].qweight.device)


def cache_dense_weights(model: nn.Module, budget_bytes: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Keep dense ``dtype`` copies of the frozen 4-bit weights of ``model`` that fit ``budget_bytes`` (see
    :func:`plan_copies`).

    A frozen weight never changes, so a dense copy turns every forward and backward through its layer into a
    plain dense matmul instead of dequantize + matmul, at the cost of the copy's memory. Layers past the
    budget drop any copy they hold. Returns ``(layers with a copy, 4-bit layers, bytes of the copies)``.
    """
    layers = frozen_layers(model)
    weights = frozen_weights(model)
    chosen = plan_copies(weights, budget_bytes, dtype)
    used = 0
    for layer, weight, keep in zip(layers, weights, chosen, strict=True):
        layer.cache_dequantized = keep
        if keep:
            used += weight.dense_bytes(dtype)
        else:
            layer.clear_cache()
    return sum(chosen), len(layers), used
