"""4-bit weight -> dense weight (fp32/fp16/bf16) in one pass over the packed bytes.

For the paths that still want a dense weight (the optional dequantized cache, odd-K fallbacks). Each
program unpacks ``BLOCK`` bytes into their two elements and scales both by their block's fp32 scale,
bit-identical to ``QuantizedWeight.dequantize`` (fp32 product, then one round to the output dtype).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nibble.errors import NibbleError
from nibble.kernels.triton_common import (
    INTERPRET,
    block_scale,
    check_device,
    tl_dtype,
    to_dtype,
    unpack,
    weight_operands,
)
from nibble.quant.base import QuantizedWeight

BLOCK = 1024


@triton.jit
def _dequant_kernel(
    packed_ptr,
    scale_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    code_ptr,
    out_ptr,
    numel,
    nbytes,
    offset,
    BS: tl.constexpr,
    NF4: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    DTYPE: tl.constexpr,
    INTERPRET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < nbytes
    byte = tl.load(packed_ptr + offs, mask=mask, other=0)
    first, second = unpack(byte, code_ptr, NF4)
    even = 2 * offs
    # both elements of a byte share a block: block sizes are even
    scale = block_scale(scale_ptr, nested_absmax_ptr, nested_code_ptr, offset, even // BS, mask, DOUBLE_QUANT)
    tl.store(out_ptr + even, to_dtype(first * scale, DTYPE, INTERPRET), mask=mask)
    tl.store(out_ptr + even + 1, to_dtype(second * scale, DTYPE, INTERPRET), mask=mask & (even + 1 < numel))


def dequantize(
    qweight: QuantizedWeight, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The dense weight in ``dtype`` and its original shape (written into ``out``, contiguous, when given).

    Raises:
        NibbleError: CPU tensors outside the interpreter, a dtype the kernels lack, or an ``out`` that does not fit.
    """
    check_device(qweight.packed)
    tl_out = tl_dtype(dtype)
    if out is None:
        out = torch.empty(qweight.shape, dtype=dtype, device=qweight.device)
    elif out.shape != torch.Size(qweight.shape) or out.dtype != dtype or not out.is_contiguous():
        raise NibbleError(f"dequantize out= must be a contiguous {dtype} tensor of shape {tuple(qweight.shape)}")
    nbytes = qweight.packed.numel()
    if nbytes == 0:
        return out
    _dequant_kernel[(triton.cdiv(nbytes, BLOCK),)](
        out_ptr=out,
        numel=qweight.numel,
        nbytes=nbytes,
        DTYPE=tl_out,
        INTERPRET=INTERPRET,
        BLOCK=BLOCK,
        # the double-quantized scale is code * absmax + offset rounded twice, as the reference computes it
        enable_fp_fusion=False,
        **weight_operands(qweight),
    )
    return out
