"""The Triton implementations the dispatcher in ``nibble.kernels`` picks up.

The dispatcher imports it only when Triton imports and is at least its ``MIN_TRITON``. Same signatures, dtypes and
results as ``nibble.kernels.reference``.

A 4-bit matmul of at least :data:`DENSE_FROM_ROWS` activation rows (training sizes) dequantizes the weight with
the Triton dequantize kernel into a temporary reused per device and dtype, then calls the dense matmul (cuBLAS on
CUDA): there the matmul is compute-bound, and the fused kernels re-dequantize every weight tile once per M tile,
gather the codebook per nibble and read activations at stride 2, which cuBLAS's tiles never pay. Fewer rows
(decoding, small batches) run the fused kernels, which read the weight once in 4 bits. bitsandbytes, Unsloth and
torchao make the same choice (dequantize then matmul for training, a fused kernel for a single row).
"""

from __future__ import annotations

import torch

from nibble.kernels import triton_gemm, triton_grad_input
from nibble.kernels.reference import linear
from nibble.kernels.triton_dequant import dequantize
from nibble.quant.base import QuantizedWeight

__all__ = ["DENSE_FROM_ROWS", "dequantize", "matmul", "matmul_grad_input"]

# From this many rows a 4-bit matmul dequantizes and calls the dense matmul (see the module docstring). A guess
# from arithmetic intensity, not yet measured on a GPU: dequantizing an [N, K] weight writes 2NK bytes, which a
# matmul of M rows amortizes over 2MNK flops; at 64 rows that is 64 flops per byte written, above an H100's
# balance point (~300 TFLOP/s over ~3 TB/s = 100 flops per byte) only by a small factor, so the dense path's extra
# traffic costs at most a few percent of the matmul while cuBLAS runs it at full speed.
# benchmarks/bench_kernels.py times both paths over M to set it from a measurement.
DENSE_FROM_ROWS = 64

_workspaces: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _dense_weight(qweight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``qweight`` dequantized into this device's and dtype's reused temporary (grown to the largest weight). The
    result is valid until the next call: each use reads it before the next dequantize writes, in stream order."""
    key = (qweight.device, dtype)
    buffer = _workspaces.get(key)
    if buffer is None or buffer.numel() < qweight.numel:
        buffer = _workspaces[key] = torch.empty(qweight.numel, dtype=dtype, device=qweight.device)
    return dequantize(qweight, dtype, out=buffer[: qweight.numel].view(qweight.shape))


def matmul(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(W)[N, K]^T (+ bias) -> [M, N]`` in ``x.dtype``: fused below :data:`DENSE_FROM_ROWS`
    rows, dequantize + dense matmul from there."""
    if x.dim() == 2 and x.shape[0] >= DENSE_FROM_ROWS and x.shape[1] == qweight.shape[1]:
        return linear(x, _dense_weight(qweight, x.dtype), bias)
    return triton_gemm.matmul(x, qweight, bias)


def matmul_grad_input(grad_y: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    """``grad_y [M, N] @ dequant(W)[N, K] -> [M, K]`` in ``grad_y.dtype``, chosen by rows as :func:`matmul`."""
    if grad_y.dim() == 2 and grad_y.shape[0] >= DENSE_FROM_ROWS and grad_y.shape[1] == qweight.shape[0]:
        return linear(grad_y, _dense_weight(qweight, grad_y.dtype).T)
    return triton_grad_input.matmul_grad_input(grad_y, qweight)
