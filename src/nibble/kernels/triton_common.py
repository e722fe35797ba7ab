"""What the Triton 4-bit kernels share: weight operands, unpacking, block scales, dtype casts, configs, launching.

Every kernel reads a weight the same way: element ``(n, k)`` of an ``[N, K]`` weight is nibble ``n*K + k``
of the packed bytes (NF4: even element in the high nibble, value from the 16-entry codebook; INT4: even
element in the low nibble, value ``q - 8``) times the scale of block ``(n*K + k) // BS``. For INT4 with
``K % group_size == 0`` that block index is exactly ``scales[n, k // group_size]`` of the ``[N, K/g]``
scale matrix, so both formats take the same path.

Under ``TRITON_INTERPRET=1`` (CPU tests) two interpreter gaps are bridged inside the kernels, guarded by
the ``INTERPRET`` constexpr so the GPU code is untouched: its fp32->bf16 cast truncates instead of
rounding to nearest even, and its ``tl.dot`` multiplies bf16 operands as raw uint16 bits. There bf16 is
rounded by hand and dot operands are widened to fp32 (exact for bf16 values, accumulated in fp32 like
tensor cores).
"""

from __future__ import annotations

import inspect
import os
import time
import weakref
from collections.abc import Callable
from functools import cache

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner

from nibble.errors import NibbleError
from nibble.quant.base import QuantizedWeight
from nibble.quant.nf4 import NESTED_BLOCKSIZE, nf4_code


def interpreting(triton_module=triton) -> bool:
    """Whether ``@triton.jit`` kernels run in the interpreter: ``triton.knobs`` where this Triton has it, else the
    ``TRITON_INTERPRET`` variable older ones read."""
    knobs = getattr(triton_module, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Read once: @triton.jit decides at import time whether kernels run interpreted.
INTERPRET: bool = interpreting()

_TL_DTYPES = {
    torch.float64: tl.float64,
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}

NESTED = tl.constexpr(NESTED_BLOCKSIZE)


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    """The Triton dtype of a float torch dtype.

    Raises:
        NibbleError: a dtype the kernels do not compute in.
    """
    if dtype not in _TL_DTYPES:
        raise NibbleError(f"the Triton 4-bit kernels compute in float64/32/16 or bfloat16, not {dtype}")
    return _TL_DTYPES[dtype]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator (and split-reduction buffer) dtype for inputs of ``dtype``: fp32, or fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact products for fp32/fp64 (tf32 would miss the 1e-5 bound)."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def check_device(t: torch.Tensor) -> None:
    """Triton runs CUDA tensors, and CPU tensors only under the interpreter."""
    if t.device.type != "cuda" and not INTERPRET:
        raise NibbleError(
            f"NIBBLE_KERNELS=triton got {t.device.type} tensors; Triton runs them only with TRITON_INTERPRET=1 "
            "(slow, for tests); use NIBBLE_KERNELS=torch or move the model to CUDA"
        )


def fused_supported(qweight: QuantizedWeight) -> bool:
    """Whether the fused kernels read this weight directly (a 2-D weight whose rows start on a byte)."""
    return len(qweight.shape) == 2 and qweight.shape[1] % 2 == 0


@cache
def _nf4_code(device: torch.device) -> torch.Tensor:
    """The NF4 codebook on ``device``, built once: building it copies 16 floats from the host (and allocates) at
    every call otherwise."""
    return nf4_code(device)


def _weight_operands(qweight: QuantizedWeight) -> dict[str, object]:
    if qweight.format == "nf4":
        dq = qweight.double_quant
        return {
            "packed_ptr": qweight.packed.contiguous(),
            "scale_ptr": qweight.absmax.contiguous(),
            "nested_absmax_ptr": qweight.nested_absmax.contiguous() if dq else None,
            "nested_code_ptr": qweight.nested_code.float().contiguous() if dq else None,
            "code_ptr": _nf4_code(qweight.device),
            "offset": float(qweight.offset) if dq else 0.0,
            "BS": qweight.blocksize,
            "NF4": True,
            "DOUBLE_QUANT": dq,
        }
    if qweight.format == "int4":
        return {
            "packed_ptr": qweight.packed.contiguous(),
            "scale_ptr": qweight.scales.contiguous(),
            "nested_absmax_ptr": None,
            "nested_code_ptr": None,
            "code_ptr": None,
            "offset": 0.0,
            "BS": qweight.group_size,
            "NF4": False,
            "DOUBLE_QUANT": False,
        }
    raise NibbleError(f"the Triton kernels do not read the '{qweight.format}' format; use NIBBLE_KERNELS=torch")


# Per weight (a layer's, alive as long as it is): its kernel arguments, and per compute dtype those of a GEMM launch.
_operands: weakref.WeakKeyDictionary[QuantizedWeight, dict[str, object]] = weakref.WeakKeyDictionary()
_gemm_constants: weakref.WeakKeyDictionary[QuantizedWeight, dict[torch.dtype, dict[str, object]]] = (
    weakref.WeakKeyDictionary()
)


def weight_operands(qweight: QuantizedWeight) -> dict[str, object]:
    """Kernel arguments describing ``qweight``: pointers, the scale offset and the format constexprs.

    Built once per weight object and shared by every later call (read it, never change it): a QuantizedWeight's
    tensors are never written after it is built (moving or cutting one makes a new weight). A weight rebuilt at
    each use (held as FSDP2 parameters) builds them at each use.
    """
    args = _operands.get(qweight)
    if args is None:
        args = _operands[qweight] = _weight_operands(qweight)
    return args


def gemm_constants(qweight: QuantizedWeight, dtype: torch.dtype) -> dict[str, object]:
    """The arguments of a GEMM-shaped kernel over ``qweight`` in ``dtype`` that do not change between calls: the
    weight's operands, its shape and the dtype constexprs (built once per weight and dtype, shared: read only).

    Raises:
        NibbleError: a dtype the kernels lack, or a format they do not read.
    """
    per_dtype = _gemm_constants.setdefault(qweight, {})
    constants = per_dtype.get(dtype)
    if constants is None:
        args = weight_operands(qweight)
        n, k = qweight.shape
        constants = per_dtype[dtype] = {
            "N": n,
            "K": k,
            "ALIGNED": k % args["BS"] == 0,
            "DTYPE": tl_dtype(dtype),
            "ACC_DTYPE": tl_dtype(acc_dtype(dtype)),
            "PRECISION": dot_precision(dtype),
            "INTERPRET": INTERPRET,
            # keeps double-quantized scales (code * absmax + offset) bit-identical to the reference's two roundings
            "enable_fp_fusion": False,
            **args,
        }
    return constants


def tile_config(
    block_m: int, block_n: int, block_k: int, split: int, group_m: int, warps: int, stages: int
) -> triton.Config:
    """One tile shape of a GEMM-shaped kernel; ``split`` > 1 spreads its reduction over programs."""
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "SPLIT": split, "GROUP_M": group_m},
        num_warps=warps,
        num_stages=stages,
    )


def m_bucket(m: int) -> int:
    """Autotune key for M: a power of two, so every batch size does not retune."""
    return min(triton.next_power_of_2(max(m, 1)), 16384)


# Largest M served by the small-M (decode) configs of the GEMM-shaped kernels.
SMALL_M = 16

# Small-M search space of every GEMM-shaped kernel (measured on the GPU at first use): M is one tile, so the
# reduction is split over SPLIT programs that add into a zeroed buffer. The 64 x 128 tile has 3 stages: with 4 it
# needs 212 KiB of shared memory (bf16, sm_80), over the 163 KiB an A100 gives a block.
SMALL_M_CONFIGS = [
    tile_config(16, bn, bk, split, 1, 4, stages)
    for bn, bk, stages in ((32, 64, 4), (64, 64, 4), (128, 64, 4), (64, 128, 3))
    for split in (1, 2, 4, 8)
]

# What the interpreter runs instead of the search spaces, so tests never benchmark: one (small-M, large-M) config.
# Every config of every search space is run under the interpreter by the kernel tests, one at a time.
INTERPRETED_CONFIGS = (tile_config(16, 32, 64, 2, 1, 1, 1), tile_config(32, 32, 64, 1, 2, 1, 1))


def search_spaces(large_m_configs: list[triton.Config]) -> tuple[list[triton.Config], list[triton.Config]]:
    """The (small-M, large-M) configs a GEMM-shaped kernel tunes over: :data:`SMALL_M_CONFIGS` and its own large-M
    ones on a GPU, the one pair of :data:`INTERPRETED_CONFIGS` under the interpreter."""
    if INTERPRET:
        return [INTERPRETED_CONFIGS[0]], [INTERPRETED_CONFIGS[1]]
    return SMALL_M_CONFIGS, large_m_configs


def prune_by_m(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs worth timing for a call (Triton's ``early_config_prune``): those whose M tile is at most M's
    autotune bucket (its next power of two), else those with the smallest M tile. A tile reaching far past the
    last row computes masked rows only, so it never wins, yet the autotuner would compile and time it."""
    bucket = {**named_args, **kwargs}["M_BUCKET"]
    limit = max(bucket, min(c.kwargs["BLOCK_M"] for c in configs))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= limit]


# Keep the measured timings on disk (in Triton's cache) where this Triton can, so a later run with the same shapes
# does not time the configs again.
_CACHE_RESULTS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def autotuned(
    kernel: triton.JITFunction, configs: tuple[list[triton.Config], list[triton.Config]], out: str
) -> tuple[Autotuner, Autotuner]:
    """The small-M and large-M autotuned forms of a GEMM-shaped kernel over ``configs`` (small-M, large-M; see
    :func:`search_spaces`) whose output pointer is named ``out``; each times only the configs :func:`prune_by_m`
    keeps.

    The small-M form adds split partial sums atomically into ``out``, so the autotuner zeroes it between trials.
    """
    key = ["M_BUCKET", "N", "K"]
    options = {"prune_configs_by": {"early_config_prune": prune_by_m}, **_CACHE_RESULTS}
    small = triton.autotune(configs[0], key=key, reset_to_zero=[out], **options)(kernel)
    return small, triton.autotune(configs[1], key=key, **options)(kernel)


# Time the autotuners spent on new keys in this process (compiling and timing their configs), and how many keys.
_tuning = {"seconds": 0.0, "keys": 0}


def tuning_time() -> tuple[float, int]:
    """Seconds the GEMM-shaped kernels' autotuners spent so far in this process (compiling and timing configs, or
    compiling the one left after pruning) and the number of (kernel, shape, dtypes) keys they tuned."""
    return _tuning["seconds"], _tuning["keys"]


_pinned: dict[int, Autotuner] = {}


def pinned(kernel: Autotuner) -> Autotuner:
    """``kernel`` with one config, never timed: its first, with ``SPLIT`` 1 (no atomic adds of partial sums in an
    order that varies, and the same tile, so the same sums, in every process). What the kernels run under
    ``torch.use_deterministic_algorithms(True)``."""
    if id(kernel) not in _pinned:
        first = kernel.configs[0]
        config = triton.Config({**first.kwargs, "SPLIT": 1}, num_warps=first.num_warps, num_stages=first.num_stages)
        _pinned[id(kernel)] = triton.autotune([config], key=kernel.keys)(kernel.fn)
    return _pinned[id(kernel)]


def launch_gemm(
    kernels: tuple[Autotuner, Autotuner],
    a: torch.Tensor,
    qweight: QuantizedWeight,
    *,
    op: str,
    operand: str,
    width: int,
    out_width: int,
    grid: Callable[[int, int, int, dict], tuple[int, int]],
    dense: Callable[[], torch.Tensor],
    operands: Callable[[torch.Tensor], dict[str, object]],
) -> torch.Tensor:
    """Run a GEMM-shaped 4-bit kernel over ``a [M, width]`` and return its ``[M, out_width]`` result in ``a.dtype``.

    Args:
        kernels: the (small-M, large-M) autotuned kernel (see ``autotuned``).
        a: the activation operand; ``op`` and ``operand`` name the function and it in the shape error.
        qweight: the ``[N, K]`` weight, passed as ``N``, ``K`` and its ``weight_operands``.
        grid: ``grid(M, N, K, meta) -> (programs over output tiles, SPLIT)``.
        dense: the result through a dense weight, for weights the fused kernels do not read (odd K).
        operands: the kernel's own pointer and stride arguments, given the output buffer.

    Small M (``SMALL_M``) runs the split-reduction kernel, which adds atomically into a zeroed buffer in the
    accumulator dtype (fp32, fp64 for fp64); larger M stores ``a.dtype`` tiles directly.

    Raises:
        NibbleError: CPU tensors outside the interpreter, a dtype the kernels lack, or ``a`` not ``[M, width]``.
    """
    check_device(a)
    if a.dim() != 2 or a.shape[1] != width:
        raise NibbleError(
            f"{op} expects {operand} of shape [M, {width}] for a weight {tuple(qweight.shape)}, got {tuple(a.shape)}"
        )
    if not fused_supported(qweight):
        # rows that start mid-byte (odd K): dense weight from the dequantize kernel instead
        return dense()
    constants = gemm_constants(qweight, a.dtype)
    m = a.shape[0]
    if m == 0:
        return a.new_empty((0, out_width))
    n, k = qweight.shape
    small = m <= SMALL_M
    out = (
        torch.zeros((m, out_width), dtype=acc_dtype(a.dtype), device=a.device) if small else a.new_empty((m, out_width))
    )
    kernel = kernels[0] if small else kernels[1]
    if torch.are_deterministic_algorithms_enabled():  # (--deterministic)
        kernel = pinned(kernel)
    tuned, start = len(kernel.cache), time.perf_counter()
    kernel[lambda meta: grid(m, n, k, meta)](M=m, M_BUCKET=m_bucket(m), ATOMIC=small, **operands(out), **constants)
    if len(kernel.cache) > tuned:  # a new key: this call tuned (on a GPU; one config under the interpreter)
        _tuning["seconds"] += time.perf_counter() - start
        _tuning["keys"] += len(kernel.cache) - tuned
    return out.to(a.dtype)


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 (ties to even), kept in fp32: the interpreter's own cast truncates."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits & 0xFFFF0000).to(tl.float32, bitcast=True)


@triton.jit
def to_dtype(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 -> ``DTYPE`` with round-to-nearest-even on GPU and in the interpreter."""
    if INTERPRET and DTYPE == tl.bfloat16:
        x = round_bf16(x)
    return x.to(DTYPE)


@triton.jit
def dot_operand(x, DTYPE: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 values -> a ``tl.dot`` operand in ``DTYPE`` (fp32 holding bf16 values in the interpreter)."""
    if INTERPRET and DTYPE == tl.bfloat16:
        out = round_bf16(x)
    else:
        out = x.to(DTYPE)
    return out


@triton.jit
def widen_operand(x, INTERPRET: tl.constexpr):
    """A loaded activation as a ``tl.dot`` operand (bf16 widened to fp32 in the interpreter)."""
    if INTERPRET and x.dtype == tl.bfloat16:
        x = x.to(tl.float32)
    return x


@triton.jit
def unpack(byte, code_ptr, NF4: tl.constexpr):
    """A tile of packed bytes -> the fp32 values of its (even, odd) elements, before scaling."""
    b = byte.to(tl.int32)
    if NF4:  # even element in the high nibble; values from the codebook
        first = tl.load(code_ptr + (b >> 4))
        second = tl.load(code_ptr + (b & 15))
    else:  # even element in the low nibble, stored as q + 8
        first = ((b & 15) - 8).to(tl.float32)
        second = ((b >> 4) - 8).to(tl.float32)
    return first, second


@triton.jit
def block_scale(scale_ptr, nested_absmax_ptr, nested_code_ptr, offset, idx, mask, DOUBLE_QUANT: tl.constexpr):
    """fp32 scales of blocks ``idx`` (undoing double quantization: code[u8] * nested_absmax + offset)."""
    if DOUBLE_QUANT:
        q = tl.load(scale_ptr + idx, mask=mask, other=0).to(tl.int32)
        nested = tl.load(nested_absmax_ptr + idx // NESTED, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + q) * nested + offset
    else:
        scale = tl.load(scale_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return scale


@triton.jit
def tile_scales(
    scale_ptr,
    nested_absmax_ptr,
    nested_code_ptr,
    offset,
    rows,
    row_mask,
    k0,
    cols,
    col_mask,
    K,
    BS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ALIGNED: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
):
    """Scales for the weight tile ``rows x [k0, k0 + BLOCK_K)`` whose even columns are ``cols``.

    When blocks start at every row (``ALIGNED``) and a tile never crosses one, each row needs one
    scale ([BLOCK_N, 1]); otherwise every element looks up its own block ([BLOCK_N, BLOCK_K/2]).
    """
    if ALIGNED and BS % BLOCK_K == 0:
        idx = rows.to(tl.int64) * (K // BS) + k0 // BS
        scale = block_scale(scale_ptr, nested_absmax_ptr, nested_code_ptr, offset, idx, row_mask, DOUBLE_QUANT)
        scale = scale[:, None]
    else:
        idx = (rows.to(tl.int64)[:, None] * K + cols[None, :]) // BS
        mask = row_mask[:, None] & col_mask[None, :]
        scale = block_scale(scale_ptr, nested_absmax_ptr, nested_code_ptr, offset, idx, mask, DOUBLE_QUANT)
    return scale


@triton.jit
def tile_indices(pid, grid_rows, grid_cols, GROUP: tl.constexpr):
    """Program id -> (row tile, column tile), walking GROUP row tiles per column so weight tiles stay in L2."""
    width = GROUP * grid_cols
    group = pid // width
    first = group * GROUP
    size = tl.minimum(grid_rows - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size
