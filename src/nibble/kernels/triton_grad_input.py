"""Fused 4-bit grad-input: ``dX[M, K] = dY[M, N] @ dequant(W)[N, K]`` without a dense W.

The backward of ``Y = X W^T`` reads W the other way round: a program owns a ``[BLOCK_M, BLOCK_K]``
tile of dX and walks N, loading ``[BLOCK_N, BLOCK_K/2]`` packed bytes per step. The even and odd
elements of each byte go to two fp32 accumulators (two ``tl.dot`` calls) that are stored to the even
and odd columns of dX, so the weight is never interleaved or materialized.

Small M splits N across programs and adds partial sums atomically into an fp32 buffer (the order of
those adds, so the last bits, can vary between runs); large M uses big tiles in an L2-friendly order
and stores directly, deterministically.
"""

from __future__ import annotations

import torch
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

# Large-M search space for the autotuner (small M: triton_common.SMALL_M_CONFIGS). The 64 x 64 x 128 and
# 64 x 32 x 256 tiles have 3 stages: with 4 they need 208 and 204 KiB of shared memory (bf16, sm_80), over the
# 163 KiB an A100 gives a block.
LARGE_M_CONFIGS = [
    tile_config(128, 64, 128, 1, 8, 8, 3),
    tile_config(128, 64, 64, 1, 8, 4, 4),
    tile_config(128, 32, 128, 1, 8, 4, 4),
    tile_config(64, 64, 128, 1, 8, 4, 3),
    tile_config(64, 64, 64, 1, 8, 4, 4),
    tile_config(128, 128, 64, 1, 8, 8, 3),
    tile_config(64, 32, 256, 1, 8, 4, 3),
    tile_config(128, 32, 64, 1, 8, 4, 4),
]


@triton.jit
def _grad_input_kernel(
    dy_ptr,
    packed_ptr,
    scale_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    code_ptr,
    dx_ptr,
    M,
    N,
    K,
    stride_dym,
    stride_dyn,
    stride_dxm,
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
    pid_m, pid_k = tile_indices(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = pid_k * BLOCK_K
    cols = k0 + 2 * tl.arange(0, BLOCK_K // 2)  # even columns of this K tile
    mask_m = offs_m < M
    mask_k = cols < K
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym

    acc_even = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=ACC_DTYPE)
    acc_odd = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=ACC_DTYPE)
    for n0 in range(pid_n * BLOCK_N, N, BLOCK_N * SPLIT):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy_ptrs = dy_rows + offs_n.to(tl.int64)[None, :] * stride_dyn
        dy = tl.load(dy_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        w_ptrs = packed_ptr + offs_n.to(tl.int64)[:, None] * (K // 2) + (cols // 2)[None, :]
        byte = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0)
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
        dy = widen_operand(dy, INTERPRET)
        acc_even = tl.dot(dy, dot_operand(w_even * scale, DTYPE, INTERPRET), acc_even, input_precision=PRECISION)
        acc_odd = tl.dot(dy, dot_operand(w_odd * scale, DTYPE, INTERPRET), acc_odd, input_precision=PRECISION)

    dx_even = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + cols[None, :]
    dx_mask = mask_m[:, None] & mask_k[None, :]
    if ATOMIC:
        tl.atomic_add(dx_even, acc_even, mask=dx_mask)
        tl.atomic_add(dx_even + 1, acc_odd, mask=dx_mask)
    else:
        tl.store(dx_even, to_dtype(acc_even, DTYPE, INTERPRET), mask=dx_mask)
        tl.store(dx_even + 1, to_dtype(acc_odd, DTYPE, INTERPRET), mask=dx_mask)


_small_m, _large_m = autotuned(_grad_input_kernel, search_spaces(LARGE_M_CONFIGS), out="dx_ptr")


def _grid(m: int, n: int, k: int, meta: dict) -> tuple[int, int]:
    """dX tiles (walked in GROUP_M order) x slices of the split N loop."""
    return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]), meta["SPLIT"]


def matmul_grad_input(grad_y: torch.Tensor, qweight: QuantizedWeight) -> torch.Tensor:
    """``grad_y [M, N] @ dequant(W)[N, K] -> [M, K]`` in ``grad_y.dtype``, reading W in 4 bits.

    Raises:
        NibbleError: CPU tensors outside the interpreter, a dtype the kernels lack, or mismatched shapes.
    """
    return launch_gemm(
        (_small_m, _large_m),
        grad_y,
        qweight,
        op="matmul_grad_input",
        operand="grad_y",
        width=qweight.shape[0],
        out_width=qweight.shape[-1],
        grid=_grid,
        dense=lambda: grad_y @ dequantize(qweight, grad_y.dtype),
        operands=lambda dx: {
            "dy_ptr": grad_y,
            "dx_ptr": dx,
            "stride_dym": grad_y.stride(0),
            "stride_dyn": grad_y.stride(1),
            "stride_dxm": dx.stride(0),
        },
    )
