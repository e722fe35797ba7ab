"""GGUF block formats (llama.cpp's ggml types) as frozen weights: torch dequantize, and quantizers for export.

A ggml tensor ``[rows, cols]`` is stored row by row; each row is ``cols / block`` blocks of ``type_size``
bytes, so rows are independent (a row permutation permutes whole byte rows). Layouts, per block:

- ``Q8_0`` (32 values, 34 bytes): fp16 ``d``, 32 int8 ``q``; ``x = q * d``.
- ``Q4_0`` (32, 18): fp16 ``d``, 16 bytes whose low nibbles are values 0-15 and high nibbles 16-31;
  ``x = (q - 8) * d``. ``Q4_1`` (32, 20) adds an fp16 ``m`` after ``d``: ``x = q * d + m``.
- ``Q5_0`` (32, 22) / ``Q5_1`` (32, 24): as Q4_0 / Q4_1 with a little-endian 32-bit word after the
  scales whose bit ``j`` is the fifth bit of value ``j``; ``x = (q - 16) * d`` / ``q * d + m``.
- ``Q4_K`` (256, 144): fp16 ``d``, fp16 ``dmin``, 12 bytes packing eight 6-bit scales ``sc`` and mins
  ``m`` (one per 32 values), 128 bytes of nibbles: byte ``32c + l`` holds value ``64c + l`` (low) and
  ``64c + 32 + l`` (high); ``x = d * sc * q - dmin * m``.
- ``Q5_K`` (256, 176): as Q4_K with 32 bytes after the scales whose bit ``s`` of byte ``l`` is the fifth
  bit of value ``32s + l``.
- ``Q6_K`` (256, 210): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, sixteen int8 scales (one
  per 16 values), fp16 ``d``; ``x = d * scale * (q - 32)``.
- ``F32``, ``F16``, ``BF16``: one value per element.

Dequantization here computes in fp32 with the same operations, in the same order, as the ``gguf``
package (and llama.cpp), so the values are bit-identical. The Q4_K and Q6_K quantizers follow llama.cpp's
reference quantizer (``quantize_row_q4_K_ref`` / ``quantize_row_q6_K_ref``, which ``llama-quantize``
uses without an importance matrix): the same scale search, in fp32, summing in the same order, so they
write the same bytes. The other types are quantized by the ``gguf`` package.
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
import torch

from nibble.errors import NibbleError
from nibble.quant.base import QuantizedWeight, check_weight

QK_K = 256
# name -> (values per block, bytes per block)
BLOCKS: dict[str, tuple[int, int]] = {
    "F32": (1, 4),
    "F16": (1, 2),
    "BF16": (1, 2),
    "Q8_0": (32, 34),
    "Q4_0": (32, 18),
    "Q4_1": (32, 20),
    "Q5_0": (32, 22),
    "Q5_1": (32, 24),
    "Q4_K": (256, 144),
    "Q5_K": (256, 176),
    "Q6_K": (256, 210),
}
# The types a GGUF-native base keeps as they are (every type above).
NATIVE_TYPES = tuple(BLOCKS)
# Super-blocks quantized per step by the K-quant quantizers: bounds their temporaries to a few MB.
_CHUNK_BLOCKS = 2048


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte ``start`` of every block, as fp32 ``[n, 1]``."""
    return blocks[:, start : start + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes ``[n, 16]`` -> values ``[n, 32]``: low nibbles first, then high nibbles."""
    return torch.cat([qs & 15, qs >> 4], dim=1)


def _fifth_bits(qh: torch.Tensor) -> torch.Tensor:
    """Four bytes per block (a little-endian 32-bit word) -> bit ``j`` for ``j`` in 0..31, as uint8 ``[n, 32]``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).reshape(qh.shape[0], 32)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit scales and mins packed in 12 bytes (K-quants), as fp32 ``[n, 8]`` each."""
    d, m, m_d = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = torch.cat([d & 63, (m_d & 15) | ((d >> 2) & 48)], dim=1)
    mins = torch.cat([m & 63, (m_d >> 4) | ((m >> 2) & 48)], dim=1)
    return sc.float(), mins.float()


def _dq_q8_0(b: torch.Tensor) -> torch.Tensor:
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)


def _dq_q4_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _dq_q4_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)


def _dq_q5_0(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 6:]) | (_fifth_bits(b[:, 2:6]) << 4)
    return _f16(b, 0) * (q.to(torch.int8) - 16).float()


def _dq_q5_1(b: torch.Tensor) -> torch.Tensor:
    q = _nibbles(b[:, 8:]) | (_fifth_bits(b[:, 4:8]) << 4)
    return _f16(b, 0) * q.float() + _f16(b, 2)


def _k_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes -> 256 values as ``[n, 8, 32]`` (sub-block, position): chunk c's low nibbles, then its high."""
    n = qs.shape[0]
    return torch.stack([qs.view(n, 4, 32) & 15, qs.view(n, 4, 32) >> 4], dim=2).view(n, 8, 32)


def _dq_q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mins = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc).view(n, 8, 1)
    dm = (_f16(b, 2) * mins).view(n, 8, 1)
    return (d * _k_nibbles(b[:, 16:]).float() - dm).view(n, QK_K)


def _dq_q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc, mins = _k_scales(b[:, 4:16])
    d = (_f16(b, 0) * sc).view(n, 8, 1)
    dm = (_f16(b, 2) * mins).view(n, 8, 1)
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)
    high = (b[:, 16:48].view(n, 1, 32) >> shifts) & 1  # [n, 8, 32]: bit s of byte l -> sub-block s
    q = _k_nibbles(b[:, 48:]) | (high << 4)
    return (d * q.float() - dm).view(n, QK_K)


def _dq_q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    ql, qh = b[:, :128].reshape(n, 2, 1, 64), b[:, 128:192].reshape(n, 2, 1, 32)
    scales = b[:, 192:208].contiguous().view(torch.int8).float()
    d = (_f16(b, 208) * scales).view(n, 16, 1)
    low = (ql >> torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(1, 1, 2, 1)) & 15
    high = (qh >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=b.device).view(1, 1, 4, 1)) & 3
    q = (low.reshape(n, 8, 32) | (high.reshape(n, 8, 32) << 4)).to(torch.int8) - 32
    return (d * q.view(n, 16, 16).float()).view(n, QK_K)


def _dq_f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32)


def _dq_f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def _dq_bf16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.bfloat16).float()


_DEQUANTIZE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "F32": _dq_f32,
    "F16": _dq_f16,
    "BF16": _dq_bf16,
    "Q8_0": _dq_q8_0,
    "Q4_0": _dq_q4_0,
    "Q4_1": _dq_q4_1,
    "Q5_0": _dq_q5_0,
    "Q5_1": _dq_q5_1,
    "Q4_K": _dq_q4_k,
    "Q5_K": _dq_q5_k,
    "Q6_K": _dq_q6_k,
}


def check_type(ggml_type: str, cols: int, name: str = "weight") -> tuple[int, int]:
    """``(values per block, bytes per block)`` of ``ggml_type``, checked to tile rows of ``cols`` values.

    Raises:
        NibbleError: a type nibble does not read, or ``cols`` not a multiple of its block.
    """
    if ggml_type not in BLOCKS:
        raise NibbleError(f"{name}: ggml type {ggml_type} is not supported; nibble reads {', '.join(BLOCKS)}")
    block, size = BLOCKS[ggml_type]
    if cols % block:
        raise NibbleError(f"{name}: rows of {cols} values do not tile {ggml_type} blocks of {block}")
    return block, size


def row_bytes(ggml_type: str, cols: int) -> int:
    """Bytes of one row of ``cols`` values stored as ``ggml_type``."""
    block, size = check_type(ggml_type, cols)
    return cols // block * size


def dequantize_blocks(data: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """Raw ``ggml_type`` bytes (uint8, any shape whose last dim is whole rows) -> fp32 values, rows kept.

    Shape ``[..., row_bytes]`` -> ``[..., cols]``.
    """
    block, size = BLOCKS[ggml_type]
    lead = data.shape[:-1]
    values = _DEQUANTIZE[ggml_type](data.reshape(-1, size))
    return values.reshape(*lead, data.shape[-1] // size * block)


class GGUFWeight(QuantizedWeight):
    """A 2-D weight ``[rows, cols]`` kept in the ggml block type a GGUF file stores it in.

    ``packed`` is uint8 ``[rows, row_bytes]``: the file's bytes, row by row. Dequantizing gives exactly the
    values llama.cpp computes with.
    """

    format = "gguf"

    def __init__(self, packed: torch.Tensor, ggml_type: str, cols: int, dtype: torch.dtype = torch.float32):
        if packed.dim() != 2 or packed.dtype != torch.uint8:
            raise NibbleError(f"GGUF block data must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
        expected = row_bytes(ggml_type, cols)
        if packed.shape[1] != expected:
            raise NibbleError(
                f"{ggml_type} rows of {cols} values take {expected} bytes, but the data has {packed.shape[1]} per row"
            )
        self.packed = packed
        self.ggml_type = ggml_type
        self.shape = torch.Size((packed.shape[0], cols))
        self.dtype = dtype

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_blocks(self.packed, self.ggml_type).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"packed": self.packed}

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """``prefix``: the block bytes; ``{prefix}.ggml_type``: the type's ggml id (an int32 scalar)."""
        type_id = int(gguf.GGMLQuantizationType[self.ggml_type])
        return {prefix: self.packed, f"{prefix}.ggml_type": torch.tensor(type_id, dtype=torch.int32)}

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> GGUFWeight:
        return GGUFWeight(tensors["packed"], self.ggml_type, self.shape[1], self.dtype)

    def select_rows(self, index: torch.Tensor) -> GGUFWeight:
        """The weight made of rows ``index`` (whole rows of blocks move; nothing is requantized)."""
        return GGUFWeight(self.packed[index.to(self.packed.device)], self.ggml_type, self.shape[1], self.dtype)

    def __repr__(self) -> str:
        return f"GGUFWeight({self.ggml_type}, shape={tuple(self.shape)}, bytes={self.memory_bytes()})"


# -- quantizers --------------------------------------------------------------------------------------
#
# The searches below are llama.cpp's, written over many blocks at once: tensors are laid out [k, n] (position
# in the block, block), every product and quotient is an fp32 operation in the reference's order, and sums
# accumulate one position at a time as its loops do, so every rounding matches. Scalars the reference
# computes in float are computed as np.float32.

_F32 = np.float32


def _round(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's ``nearest_int``: its fp32 magic-number trick rounds half to even, as ``torch.round`` does."""
    return torch.round(x)


def _seq_sum(terms: torch.Tensor) -> torch.Tensor:
    """``[k, n] -> [n]``: a float accumulator starting at 0 with the k terms added in order."""
    total = terms[0] + 0.0
    for i in range(1, terms.shape[0]):
        total += terms[i]
    return total


def _div(num: float, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` rounded once, as C divides (torch computes ``float / tensor`` as ``num * (1 / den)``, which
    rounds twice)."""
    return torch.div(torch.tensor(num, dtype=torch.float32, device=den.device), den)


def _safe(den: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """``den`` where ``ok``, else 1 (a denominator whose quotient is discarded)."""
    return torch.where(ok, den, torch.ones_like(den))


def _make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """Per block (column) of ``x`` [k, n]: asymmetric ``nmax``-level quantization with weights ``w``
    (``make_qkx2_quants`` with squared error). Returns ``(levels [k, n] as floats, scale [n], offset [n])``
    with ``x ~ scale * level - offset`` and offset >= 0."""
    hi = x.amax(dim=0)
    lo = torch.clamp(x.amin(dim=0), max=0.0)  # the min, raised to 0 when positive
    start = lo
    flat = hi == lo
    sum_w = _seq_sum(w)
    sum_x = _seq_sum(w * x)
    iscale = _div(float(_F32(nmax)), _safe(hi - lo, ~flat))
    scale = _div(1.0, iscale)
    levels = _round(iscale * (x - lo)).clamp_(0, nmax)
    diff = scale * levels + lo - x
    best = _seq_sum(w * (diff * diff))
    for step in range(nstep + 1):
        numerator = float(_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax))
        span = hi - lo  # lo follows the best fit so far, as the reference's min does
        trial = _round(_div(numerator, _safe(span, span != 0)) * (x - lo)).clamp_(0, nmax)
        wl = w * trial
        sum_l, sum_l2, sum_xl = _seq_sum(wl), _seq_sum(wl * trial), _seq_sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / _safe(det, ok)
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / _safe(det, ok)
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / _safe(sum_l2, positive), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        diff = this_scale * trial + this_min - x
        error = _seq_sum(w * (diff * diff))
        better = ok & (error < best) & ~flat
        levels = torch.where(better, trial, levels)
        best = torch.where(better, error, best)
        scale = torch.where(better, this_scale, scale)
        lo = torch.where(better, this_min, lo)
    levels = torch.where(flat, torch.zeros_like(levels), levels)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    return levels, scale, -torch.where(flat, start, lo)


def _quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    """Super-blocks ``[n, 256]`` (fp32) -> Q4_K bytes ``[n, 144]``."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32).T.contiguous()  # [32, 8n]
    # torch's fp32 sqrt can be an ulp off; the fp64 root rounded to fp32 is the correctly rounded sqrtf
    av = torch.sqrt((_seq_sum(sub * sub) / 32).double()).float()
    levels, scales, mins = _make_qkx2(sub, av + sub.abs(), 15, -1.0, 0.1, 20)
    scales, mins = scales.view(n, 8), mins.view(n, 8)
    levels = levels.T.reshape(n, 8, 32)
    # running maxima that start at 0, as the reference keeps them
    max_scale, max_min = scales.amax(dim=1), mins.amax(dim=1)
    max_scale = torch.where(max_scale > 0, max_scale, 0.0)  # +0 (not -0) when no value is above it
    max_min = torch.where(max_min > 0, max_min, 0.0)
    inv_scale = torch.where(max_scale > 0, _div(63.0, _safe(max_scale, max_scale > 0)), 0.0)
    inv_min = torch.where(max_min > 0, _div(63.0, _safe(max_min, max_min > 0)), 0.0)
    # stored as uint8_t (modulo 256), then capped at 63
    ls = (_round(inv_scale[:, None] * scales).to(torch.int32) & 255).clamp(max=63).to(torch.uint8)
    lm = (_round(inv_min[:, None] * mins).to(torch.int32) & 255).clamp(max=63).to(torch.uint8)
    packed_scales = torch.cat(
        [
            ls[:, :4] | ((ls[:, 4:] >> 4) << 6),
            lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
            (ls[:, 4:] & 15) | ((lm[:, 4:] & 15) << 4),
        ],
        dim=1,
    )
    d, dmin = (max_scale / 63).half(), (max_min / 63).half()
    sc, m = _k_scales(packed_scales)
    dl = d.float()[:, None] * sc  # [n, 8]
    dml = dmin.float()[:, None] * m
    nonzero = (dl != 0)[..., None]
    requant = _round((x.view(n, 8, 32) + dml[..., None]) / _safe(dl, dl != 0)[..., None]).clamp_(0, 15)
    levels = torch.where(nonzero, requant, levels).to(torch.uint8)
    chunks = levels.view(n, 4, 2, 32)  # chunk c holds sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles)
    qs = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, 128)
    return torch.cat([d.view(n, 1).view(torch.uint8), dmin.view(n, 1).view(torch.uint8), packed_scales, qs], dim=1)


def _make_qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block (column) of ``x`` [k, n]: symmetric quantization to ``[-nmax, nmax - 1]`` weighted by ``x^2``
    (``make_qx_quants`` with rmse_type 1). Returns ``(levels + nmax [k, n] as floats, scale [n])``."""
    ax = x.abs()
    first = ax.argmax(dim=0, keepdim=True)  # the first element of largest magnitude
    top = x.gather(0, first).squeeze(0)
    empty = ax.gather(0, first).squeeze(0) < 1e-15
    top = torch.where(empty, torch.ones_like(top), top)
    weights = x * x

    def attempt(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        levels = _round(iscale * x).clamp_(-nmax, nmax - 1)
        wl = weights * levels
        return levels, _seq_sum(weights * x * levels), _seq_sum(wl * levels)

    levels, sumlx, suml2 = attempt(_div(float(_F32(-nmax)), top))
    scale = torch.where(suml2 != 0, sumlx / _safe(suml2, suml2 != 0), 0.0)
    best = scale * sumlx
    for step in [*range(-9, 0), *range(1, 10)]:
        trial, sumlx, suml2 = attempt(_div(float(-(_F32(nmax) + _F32(0.1) * _F32(step))), top))
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        this_scale = sumlx / _safe(suml2, better)
        levels = torch.where(better, trial, levels)
        scale = torch.where(better, this_scale, scale)
        best = torch.where(better, this_scale * sumlx, best)
    # an all-zero block keeps level 0 (not nmax), as the reference leaves it
    levels = torch.where(empty, torch.zeros_like(levels), levels + nmax)
    return levels, torch.where(empty, torch.zeros_like(scale), scale)


def _quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    """Super-blocks ``[n, 256]`` (fp32) -> Q6_K bytes ``[n, 210]``."""
    n = x.shape[0]
    levels, scales = _make_qx(x.reshape(n * 16, 16).T.contiguous(), 32)
    levels, scales = levels.T.reshape(n, 16, 16), scales.view(n, 16)
    pick = scales.abs().argmax(dim=1, keepdim=True)  # the first scale of largest magnitude, with its sign
    max_scale = scales.gather(1, pick).squeeze(1)
    empty = scales.abs().gather(1, pick).squeeze(1) < 1e-15
    iscale = _div(-128.0, _safe(max_scale, ~empty))
    d = _div(1.0, iscale).half()
    q_scales = _round(iscale[:, None] * scales).clamp_(max=127).to(torch.int8)
    dl = d.float()[:, None] * q_scales.float()  # [n, 16]
    requant = _round(x.view(n, 16, 16) / _safe(dl, dl != 0)[..., None]).clamp_(-32, 31) + 32
    levels = torch.where((dl != 0)[..., None], requant, levels).to(torch.uint8).view(n, 2, 4, 32)
    low = levels & 15
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], dim=2)  # [n, 2, 64]
    high = levels >> 4
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)  # [n, 2, 32]
    out = torch.cat(
        [ql.reshape(n, 128), qh.reshape(n, 64), q_scales.view(torch.uint8), d.view(n, 1).view(torch.uint8)], dim=1
    )
    return torch.where(empty[:, None], torch.zeros_like(out), out)  # an all-zero super-block is all zero bytes


_K_QUANTIZERS = {"Q4_K": _quantize_q4_k, "Q6_K": _quantize_q6_k}
# The types nibble can write: the K-quants above, the rest through the gguf package.
QUANTIZE_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")


def quantize_blocks(weight: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """A 2-D float weight ``[rows, cols]`` -> its ``ggml_type`` bytes, uint8 ``[rows, row_bytes]``.

    Raises:
        NibbleError: a type nibble does not write, ``cols`` not a multiple of its block, NaN/inf values.
    """
    check_weight(weight)
    if weight.dim() != 2:
        raise NibbleError(f"GGUF blocks quantize 2-D weights [rows, cols]; got shape {tuple(weight.shape)}")
    if ggml_type not in QUANTIZE_TYPES:
        raise NibbleError(f"nibble does not write ggml type {ggml_type}; use one of {', '.join(QUANTIZE_TYPES)}")
    rows, cols = weight.shape
    width = row_bytes(ggml_type, cols)
    x = weight.detach().to("cpu", torch.float32).contiguous()
    if ggml_type in _K_QUANTIZERS:
        blocks = x.view(-1, QK_K)
        out = torch.cat(
            [_K_QUANTIZERS[ggml_type](blocks[i : i + _CHUNK_BLOCKS]) for i in range(0, blocks.shape[0], _CHUNK_BLOCKS)]
        )
        return out.view(rows, width)
    data = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[ggml_type])
    return torch.from_numpy(np.ascontiguousarray(data).view(np.uint8).reshape(rows, width))


def quantize(weight: torch.Tensor, ggml_type: str) -> GGUFWeight:
    """``weight`` [rows, cols] stored as ``ggml_type`` (see :func:`quantize_blocks`)."""
    return GGUFWeight(quantize_blocks(weight, ggml_type), ggml_type, weight.shape[1], weight.dtype)
