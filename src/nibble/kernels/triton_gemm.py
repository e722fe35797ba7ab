"""Fused 4-bit forward: ``Y[M, N] = X[M, K] @ dequant(W)[N, K]^T (+ bias)`` without a dense W.

Each program owns a ``[BLOCK_M, BLOCK_N]`` tile of Y and walks K: it loads ``[BLOCK_N, BLOCK_K/2]``
packed bytes, unpacks the even and odd elements of each byte, scales them in fp32 (the same product
the reference dequantization rounds), casts to the input dtype and feeds two ``tl.dot`` calls against
the even and odd columns of X, so no nibble interleaving is needed. Accumulation is fp32.

Two autotuned families: small M (decode, memory-bound) splits K across programs and adds partial
sums atomically into an fp32 buffer, so even M = 1 fills the GPU (the order of those adds, so the last
bits of the result, can vary between runs); large M (training, compute-bound) uses big tiles in an
L2-friendly order and stores directly, deterministically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from nibble.kernels.triton_common import (
    autotuned,
    dot_operand,
    launch_gemm,
    search_spaces,
    tile_config,
    tile_indices,
    tile_scales,
    to_dtype,
    unpack,
    widen_operand,
)
from nibble.kernels.triton_dequant import dequantize
from nibble.quant.base import QuantizedWeight

# Large-M search space for the autotuner (small M: triton_common.SMALL_M_CONFIGS).
LARGE_M_CONFIGS = [
    tile_config(128, 128, 64, 1, 8, 8, 3),
    tile_config(128, 256, 64, 1, 8, 8, 3),
    tile_config(128, 256, 32, 1, 8, 8, 4),
    tile_config(64, 128, 64, 1, 8, 4, 4),
    tile_config(128, 64, 64, 1, 8, 4, 4),
    tile_config(64, 256, 32, 1, 8, 4, 4),
    tile_config(128, 128, 32, 1, 8, 4, 4),
    tile_config(64, 64, 64, 1, 8, 4, 4),
]


@triton.jit
def _matmul_kernel(
    x_ptr,
    packed_ptr,
    scale_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    code_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_ym,
    offset,
    M_BUCKET,  # autotune key only
    BS: tl.constexpr,
    NF4: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    ALIGNED: tl.constexpr,
    DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    ATOMIC: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = tile_indices(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    half = tl.arange(0, BLOCK_K // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = packed_ptr + offs_n.to(tl.int64)[:, None] * (K // 2)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT):
        cols = k0 + 2 * half  # even columns of this K tile
        mask_k = cols < K
        x_mask = mask_m[:, None] & mask_k[None, :]
        x_even = tl.load(x_rows + cols.to(tl.int64)[None, :] * stride_xk, mask=x_mask, other=0.0)
        x_odd = tl.load(x_rows + (cols + 1).to(tl.int64)[None, :] * stride_xk, mask=x_mask, other=0.0)
        byte = tl.load(w_rows + (cols // 2)[None, :], mask=mask_n[:, None] & mask_k[None, :], other=0)
        w_even, w_odd = unpack(byte, code_ptr, NF4)
        scale = tile_scales(
            scale_ptr,
            nested_absmax_ptr,
            nested_code_ptr,
            offset,
            offs_n,
            mask_n,
            k0,
            cols,
            mask_k,
            K,
            BS,
            BLOCK_K,
            ALIGNED,
            DOUBLE_QUANT,
        )
        w_even = dot_operand(w_even * scale, DTYPE, INTERPRET)  # [BLOCK_N, BLOCK_K/2]
        w_odd = dot_operand(w_odd * scale, DTYPE, INTERPRET)
        acc = tl.dot(widen_operand(x_even, INTERPRET), tl.trans(w_even), acc, input_precision=PRECISION)
        acc = tl.dot(widen_operand(x_odd, INTERPRET), tl.trans(w_odd), acc, input_precision=PRECISION)

    if bias_ptr is not None:
        if pid_k == 0:  # with split K only the first slice adds it
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(ACC_DTYPE)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
    y_mask = mask_m[:, None] & mask_n[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=y_mask)
    else:
        tl.store(y_ptrs, to_dtype(acc, DTYPE, INTERPRET), mask=y_mask)


_small_m, _large_m = autotuned(_matmul_kernel, search_spaces(LARGE_M_CONFIGS), out="y_ptr")


def _grid(m: int, n: int, k: int, meta: dict) -> tuple[int, int]:
    """Y tiles (walked in GROUP_M order) x slices of the split K loop."""
    return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT"]


def matmul(x: torch.Tensor, qweight: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(W)[N, K]^T (+ bias) -> [M, N]`` in ``x.dtype``, reading W in 4 bits.

    Raises:
        NibbleError: CPU tensors outside the interpreter, a dtype the kernels lack, or mismatched shapes.
    """
    bias = None if bias is None else bias.to(x.dtype)  # rounded as the reference rounds it
    return launch_gemm(
        (_small_m, _large_m),
        x,
        qweight,
        op="matmul",
        operand="x",
        width=qweight.shape[-1],
        out_width=qweight.shape[0],
        grid=_grid,
        dense=lambda: F.linear(x, dequantize(qweight, x.dtype), bias),
        operands=lambda y: {
            "x_ptr": x,
            "bias_ptr": None if bias is None else bias.contiguous(),
            "y_ptr": y,
            "stride_xm": x.stride(0),
            "stride_xk": x.stride(1),
            "stride_ym": y.stride(0),
        },
    )
