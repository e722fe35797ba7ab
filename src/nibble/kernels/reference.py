"""Pure-torch reference ops for 4-bit weights: dequantize once, then a dense matmul.

These run anywhere and define the results the Triton kernels must reproduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nibble.quant.base import QuantizedWeight


def dequantize(qweight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight ``[N, K]`` in ``dtype``."""
    return qweight.dequantize(dtype)


def matmul(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W[N, K]^T (+ bias) -> [M, N]`` in ``x.dtype``."""
    w = qweight.dequantize(x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def matmul_grad_input(grad_y: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    """``grad_y [M, N] @ W[N, K] -> [M, K]`` in ``grad_y.dtype``."""
    return grad_y @ qweight.dequantize(grad_y.dtype)
