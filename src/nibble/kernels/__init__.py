"""The one dispatch point for 4-bit matmuls: Triton kernels on CUDA, the torch reference elsewhere.

``NIBBLE_KERNELS`` chooses: ``auto`` (default: Triton for CUDA tensors when it imports, else torch),
``torch`` (always the reference) or ``triton`` (always Triton; with ``TRITON_INTERPRET=1`` this runs
on CPU tensors, which is how the kernels are tested without a GPU).
"""

from __future__ import annotations

import os
from functools import cache
from types import ModuleType

import torch

from nibble.errors import NibbleError
from nibble.kernels import reference
from nibble.quant.base import QuantizedWeight

BACKENDS = ("auto", "torch", "triton")


@cache
def _triton_ops() -> ModuleType | None:
    try:
        from nibble.kernels import triton_ops
    except ImportError:
        return None
    return triton_ops


def backend_name(device: torch.device) -> str:
    """Which implementation runs for tensors on ``device``: ``"torch"`` or ``"triton"``."""
    choice = os.environ.get("NIBBLE_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise NibbleError(f"NIBBLE_KERNELS={choice!r} is not valid; use one of {', '.join(BACKENDS)}")
    if choice == "torch":
        return "torch"
    available = _triton_ops() is not None
    if choice == "triton":
        if not available:
            raise NibbleError("NIBBLE_KERNELS=triton but the Triton kernels cannot be imported; pip install triton")
        return "triton"
    return "triton" if available and device.type == "cuda" else "torch"


def _ops(device: torch.device) -> ModuleType:
    return _triton_ops() if backend_name(device) == "triton" else reference


def dequantize(qweight: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense ``[N, K]`` weight in ``dtype``."""
    return _ops(qweight.device).dequantize(qweight, dtype)


def matmul(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(W)[N, K]^T (+ bias) -> [M, N]``, in ``x.dtype``."""
    return _ops(x.device).matmul(x, qweight, bias)


def matmul_grad_input(grad_y: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    """``grad_y [M, N] @ dequant(W)[N, K] -> [M, K]``, in ``grad_y.dtype``."""
    return _ops(grad_y.device).matmul_grad_input(grad_y, qweight)
