"""Pure-torch reference ops for 4-bit weights: dequantize once, then a dense matmul.

These run anywhere and define the results the Triton kernels must reproduce. :func:`linear` is the dense
matmul every one of them ends in, and how a bf16/fp16 matmul runs on a CPU without bf16 arithmetic.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from nibble.devices import cpu_has_native_bf16, is_onednn_failure, under_memory_limit
from nibble.errors import first_line
from nibble.quant.base import QuantizedWeight

_LOW_PRECISION = (torch.bfloat16, torch.float16)
# Below this many rows the fp32 copy of the weight costs more than the emulated bf16 matmul it replaces
# (2-core AVX2 EPYC, 4096x4096 weight: 1 row 40 ms on fp32 units vs 2.6 native, 16 rows 48 vs 25, 32 rows
# 44 vs 50, 128 rows 79 vs 198), so one-token decoding keeps the native kernel.
FP32_UNITS_MIN_ROWS = 16


# Set once oneDNN failed to build a low-precision CPU matmul: from then on this process multiplies them on fp32
# units, whose kernels (BLAS sgemm) need no code generated at run time.
_onednn_failed = False
_limit_noted = False


def on_fp32_units(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :func:`linear` multiplies ``dtype`` operands on ``device`` as fp32 (see :func:`fp32_units_reason`)."""
    return fp32_units_reason(dtype, device) is not None


def fp32_units_reason(dtype: torch.dtype, device: torch.device) -> str | None:
    """Why :func:`linear` multiplies ``dtype`` operands on ``device`` as fp32, or None where it does not: bf16/fp16
    on a CPU without native bf16 arithmetic (see :func:`nibble.devices.cpu_has_native_bf16`), or on any CPU whose
    native kernels cannot be trusted: they failed to build in this process, or it runs under a memory limit (see
    :func:`nibble.devices.under_memory_limit`; oneDNN is then switched off for every other op too)."""
    global _limit_noted
    if device.type != "cpu" or dtype not in _LOW_PRECISION:
        return None
    limited = under_memory_limit()
    if limited and not _limit_noted:
        torch.backends.mkldnn.enabled = False  # its run-time generated kernels may crash near the limit
        print("note: the process runs under a memory limit: bf16 matmuls run on fp32 units", file=sys.stderr)
        _limit_noted = True
    if not cpu_has_native_bf16():
        return "the CPU has no native bf16 arithmetic"
    if _onednn_failed:
        return "the CPU's native bf16 kernels (oneDNN) failed to build"
    if not limited:
        return None
    return "the process runs under a memory limit"


# Up to this many keys, a native bf16 CPU's fused attention (forward + backward) is slower than the same
# attention on fp32 units: SmolLM2's heads (9 of 64 over 3), 640 tokens a batch, 2 threads, AVX512-BF16 EPYC:
# 2.0-2.4x at 40 keys, 1.7-1.9x at 64, 1.45-1.6x at 128, 1.04-1.1x at 256, 0.91-0.94x at 512 (0.74x at 1024
# for Qwen3's 16 of 128 over 8).
FP32_ATTENTION_MAX_KEYS = 256


def attention_on_fp32_units(dtype: torch.dtype, device: torch.device, keys: int) -> bool:
    """Whether attention over ``keys`` keys in ``dtype`` runs on fp32 units: where :func:`linear` does, and on a
    CPU with native bf16 arithmetic up to :data:`FP32_ATTENTION_MAX_KEYS` keys, where that is faster."""
    short = device.type == "cpu" and dtype in _LOW_PRECISION and keys <= FP32_ATTENTION_MAX_KEYS
    return short or on_fp32_units(dtype, device)


def _linear_on_fp32_units(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T (+ bias) -> [..., N]`` in ``x.dtype`` (``weight`` and ``bias`` cast to it).

    bf16/fp16 operands of at least :data:`FP32_UNITS_MIN_ROWS` rows on a CPU without bf16 arithmetic are
    multiplied on its fp32 units: the products of the rounded operands are exact in fp32 and summed in fp32,
    and the result is rounded to ``x.dtype`` — what a native bf16 matmul computes, at fp32 speed. On a 2-core
    AVX2 EPYC, ``F.linear`` in bf16 ran at 5 GFLOP/s and ``grad @ W`` at 1, against 13 for this (26 for fp32
    itself). Gradients flow through the casts, so they are rounded where a native bf16 backward rounds them.

    A native low-precision CPU matmul that oneDNN cannot build (near a memory limit, or a shape it does not
    support) is computed on fp32 units instead, and so is every later one in this process (one warning says so);
    under a memory limit every one is, since oneDNN may crash there rather than raise.
    """
    global _onednn_failed
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    if on_fp32_units(x.dtype, x.device) and (
        x.numel() >= FP32_UNITS_MIN_ROWS * x.shape[-1] or cpu_has_native_bf16()  # native: only when unsafe
    ):
        return _linear_on_fp32_units(x, weight, bias)
    try:
        return F.linear(x, weight, bias)
    except RuntimeError as exc:
        if x.device.type != "cpu" or x.dtype not in _LOW_PRECISION or not is_onednn_failure(exc):
            raise
        if not _onednn_failed:
            note = f"note: oneDNN failed ({first_line(exc)}): this and later {x.dtype} matmuls run on fp32 units"
            print(note, file=sys.stderr)
        _onednn_failed = True
        return _linear_on_fp32_units(x, weight, bias)


def dequantize(qweight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight ``[N, K]`` in ``dtype``."""
    return qweight.dequantize(dtype)


def matmul(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W[N, K]^T (+ bias) -> [M, N]`` in ``x.dtype``."""
    return linear(x, qweight.dequantize(x.dtype), bias)


def matmul_grad_input(grad_y: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    """``grad_y [M, N] @ W[N, K] -> [M, K]`` in ``grad_y.dtype``."""
    return linear(grad_y, qweight.dequantize(grad_y.dtype).T)
