"""QuantLinear: a frozen linear layer whose weight is stored in 4 bits, and the policy for its dense copies."""

from __future__ import annotations

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


class QuantLinear(nn.Module):
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
        self._cache: dict[torch.dtype, torch.Tensor] = {}

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
    def format(self) -> str:
        return self.qweight.format

    def cached_weight(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The dequantized weight in ``dtype`` when caching is on (built on first use), else None."""
        if not self.cache_dequantized:
            return None
        if dtype not in self._cache:
            self._cache[dtype] = kernels.dequantize(self.qweight, dtype)
        return self._cache[dtype]

    def clear_cache(self) -> None:
        self._cache.clear()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return kernels.dequantize(self.qweight, dtype)

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

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # Module.to(dtype) would cast the fp32 block scales; a 4-bit weight only ever changes device.
        target = fn(torch.empty(0, dtype=torch.uint8, device=self.qweight.device)).device
        if target != self.qweight.device:
            self.qweight = self.qweight.to(target)
            self._cache.clear()
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self.qweight.state_dict(prefix + "weight"))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, "
            f"bias={self.bias is not None}, cache_dequantized={self.cache_dequantized}"
        )


def cache_budget_bytes(budget_mb: int | None) -> int:
    """Bytes for dense copies of frozen 4-bit weights: ``budget_mb`` MiB, or half the available memory for None."""
    if budget_mb is not None:
        return budget_mb * 2**20
    available = memory_available_bytes()
    return available // 2 if available is not None else 0


def cache_dense_weights(model: nn.Module, budget_bytes: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """Keep dense ``dtype`` copies of the frozen 4-bit weights of ``model``, in model order, while they fit.

    A frozen weight never changes, so a dense copy turns every forward and backward through its layer into a
    plain dense matmul instead of dequantize + matmul, at the cost of the copy's memory. Layers past the
    budget drop any copy they hold. Returns ``(layers with a copy, 4-bit layers, bytes of the copies)``.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    element = torch.empty(0, dtype=dtype).element_size()
    used = cached = 0
    for layer in layers:
        size = layer.in_features * layer.out_features * element
        layer.cache_dequantized = used + size <= budget_bytes
        if layer.cache_dequantized:
            used += size
            cached += 1
        else:
            layer.clear_cache()
    return cached, len(layers), used
