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

__all__ = ["DENSE_FROM_ROWS", "dequantize", "dequantize_then_matmul", "matmul", "matmul_grad_input"]

# From this many rows a 4-bit matmul dequantizes and calls the dense matmul (see the module docstring). A guess from
# a roofline, not yet measured on a GPU. For an [N, K] bf16 weight the dense path moves ~4.5 NK bytes more than the
# fused kernel (reads NK/2 packed, writes 2NK, the matmul reads 2NK back) and then runs 2MNK flops at cuBLAS speed P;
# the fused kernel reads only NK/2 bytes but runs at a fraction f of P. They break even where
# 4.5 NK / bandwidth = 2MNK / P * (1/f - 1), i.e. M = 2.25 * (P / bandwidth) / (1/f - 1): with an H100's ~300
# flops per byte (990 TFLOP/s over 3.35 TB/s) and f = 0.5 (fused at 40-70% of cuBLAS), M ~ 660; f = 0.4 gives 440,
# f = 0.6 gives 1000. 512 is the power of two (an autotune bucket) in that range. Below it the fused kernel wins by
# far (at M = 64 it reads 9x fewer bytes); decoding and small batches stay fused, training micro-batches (batch x
# sequence, thousands of rows) dequantize. benchmarks/bench_kernels.py times both paths over M to set it.
DENSE_FROM_ROWS = 512


def dequantize_then_matmul(rows: int) -> bool:
    """Whether a 4-bit matmul over ``rows`` activation rows dequantizes and calls the dense matmul (from
    :data:`DENSE_FROM_ROWS` rows) rather than running the fused kernel."""
    return rows >= DENSE_FROM_ROWS


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
    if x.dim() == 2 and dequantize_then_matmul(x.shape[0]) and x.shape[1] == qweight.shape[1]:
        return linear(x, _dense_weight(qweight, x.dtype), bias)
    return triton_gemm.matmul(x, qweight, bias)


def matmul_grad_input(grad_y: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    """``grad_y [M, N] @ dequant(W)[N, K] -> [M, K]`` in ``grad_y.dtype``, chosen by rows as :func:`matmul`."""
    if grad_y.dim() == 2 and dequantize_then_matmul(grad_y.shape[0]) and grad_y.shape[1] == qweight.shape[0]:
        return linear(grad_y, _dense_weight(qweight, grad_y.dtype).T)
    return triton_grad_input.matmul_grad_input(grad_y, qweight)
