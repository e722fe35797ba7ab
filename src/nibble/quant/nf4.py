"""NF4: 4-bit NormalFloat, byte-compatible with bitsandbytes.

Layout (facts fixed by bitsandbytes, see shared/design.md):
- the weight is flattened row-major and cut into blocks of ``blocksize`` elements (the last may be
  partial); each block keeps its fp32 absmax and each element the index of the nearest code of
  ``value / absmax`` (ties go to the lower index);
- two codes per byte, the even (first) element in the high nibble; an odd count pads with code 7 (0.0);
- double quantization stores ``absmax - mean(absmax)`` with bitsandbytes' signed 8-bit dynamic code
  in blocks of 256, plus one fp32 absmax per nested block and the mean as ``offset``.
"""

from __future__ import annotations

import json
import math
from functools import cache

import torch

from nibble.errors import NibbleError
from nibble.quant.base import QuantizedWeight, check_weight
from nibble.quant.spec import NF4_BLOCKSIZES as VALID_BLOCKSIZES

NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NESTED_BLOCKSIZE = 256
_GRID = 65536
# Elements quantized per step: bounds the temporaries to ~30 MB; smaller steps were slower (more ops per tensor).
_CHUNK = 1 << 21


@cache
def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 16 NF4 code values (fp32, ascending)."""
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


@cache
def _nf4_bounds(device: torch.device) -> torch.Tensor:
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


@cache
def _byte_pair_table(device: torch.device) -> torch.Tensor:
    """[65536, 4] fp32: the four code values held by two consecutive packed bytes.

    Indexed by the two bytes read as one little-endian uint16, so one lookup decodes four elements:
    on 4096x4096 this decodes in 23 ms against 35 ms for a 256-entry byte table (2-core x86-64).
    """
    code = nf4_code(device)
    pair = torch.arange(65536, device=device)
    first, second = pair & 255, pair >> 8
    return torch.stack([code[first >> 4], code[first & 15], code[second >> 4], code[second & 15]], dim=1)


def decode_codes(packed: torch.Tensor) -> torch.Tensor:
    """fp32 code values of every nibble in ``packed`` (2 per byte, high nibble first), unscaled."""
    if packed.numel() % 2:
        packed = torch.cat([packed, packed.new_zeros(1)])
    index = packed.view(torch.int16).int().bitwise_and_(0xFFFF)
    return torch.index_select(_byte_pair_table(packed.device), 0, index).view(-1)


@cache
def dynamic_code(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code (256 fp32 values, ascending).

    For exponents e = 0..6 it places 2**e values at the midpoints of ``linspace(0.1, 1, 2**e + 1)``
    scaled by ``10**(e - 6)``, each with both signs, then adds 0 and 1.
    """
    values: list[float] = [0.0, 1.0]
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1)
        means = (bounds[:-1] + bounds[1:]) / 2
        scaled = (10 ** (e - 6)) * means
        values += scaled.tolist() + (-scaled).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


# Nearest-code lookup: a value v in [-1, 1] falls in cell round(CELLS/2 * (v + 1)) of a uniform grid; a
# cell holds at most one midpoint between codes, so the code is the cell's base code, plus one when v is
# past that midpoint. One gather and one comparison instead of bucketize's binary search: 4096x4096 codes
# in 0.8 s against 4.5 s, both measured in one run on a loaded 2-core x86-64 (see benchmarks/README.md).
_CELLS = 4096
# fp32 v*CELLS/2 + _MAGIC has the cell index as its low mantissa bits (2**23 <= it < 2**24): the float to
# int conversion is a reinterpretation and one integer subtraction.
_MAGIC = float(2**23 + _CELLS // 2)
_MAGIC_BITS = 0x4B000000  # the bits of fp32 2**23


@cache
def _nf4_cell_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(base [CELLS+1] uint8, midpoint [CELLS+1] fp32)``: per cell, the code below it and the one
    midpoint inside it (+inf where none).

    A cell is widened by 1% on each side, far more than the rounding of the cell computation, so a value
    is never judged by a cell it is not in; midpoints are 0.08 apart, a cell 0.0005 wide.
    """
    bounds = _nf4_bounds(device)
    exact = bounds.double()
    cells = torch.arange(_CELLS + 1, dtype=torch.float64, device=device)
    lo = (cells - 0.51) / (_CELLS / 2) - 1.0
    hi = (cells + 0.51) / (_CELLS / 2) - 1.0
    base = torch.searchsorted(exact, lo)  # midpoints below the cell
    midpoint = torch.full((_CELLS + 1,), float("inf"), dtype=torch.float32, device=device)
    inside = (exact[None, :] >= lo[:, None]) & (exact[None, :] <= hi[:, None])  # [cells, 15]
    cell, which = inside.nonzero(as_tuple=True)
    midpoint[cell] = bounds[which]
    return base.to(torch.uint8), midpoint


def _nearest_codes(scaled: torch.Tensor, out: torch.Tensor) -> None:
    """``out`` [n] uint8 = index of the nearest NF4 code of each ``scaled`` [n] value in [-1, 1] (ties go to
    the lower index): exactly ``bucketize(scaled, midpoints)``."""
    base, midpoint = _nf4_cell_tables(scaled.device)
    magic = scaled.new_tensor(_MAGIC)
    cell = torch.addcmul(magic, scaled, scaled.new_tensor(_CELLS / 2)).view(torch.int32).sub_(_MAGIC_BITS)
    torch.index_select(base, 0, cell, out=out)
    out.add_(scaled > torch.index_select(midpoint, 0, cell))


def _blockwise_codes(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest-code indices (uint8) and fp32 absmax per block of a flat fp32 tensor.

    Full blocks scale by the reciprocal of their absmax and a partial last block divides by it:
    that is how bitsandbytes rounds, and byte equality depends on it.
    """
    n = flat.numel()
    full = n - n % blocksize
    codes = torch.empty(n, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(math.ceil(n / blocksize), dtype=torch.float32, device=flat.device)
    chunk = max(_CHUNK - _CHUNK % blocksize, blocksize)
    for start in range(0, full, chunk):
        end = min(start + chunk, full)
        blocks = flat[start:end].view(-1, blocksize)
        low, high = torch.aminmax(blocks, dim=1)
        amax = torch.maximum(high, -low)
        absmax[start // blocksize : end // blocksize] = amax
        scaled = blocks * (1.0 / amax.clamp(min=1e-38)).unsqueeze(1)
        # Values a rounding step past ±1 land in the outermost cells, so no clamp is needed.
        _nearest_codes(scaled.view(-1), codes[start:end])
    if full < n:
        tail = flat[full:]
        amax = tail.abs().amax().clamp(min=1e-38)
        absmax[-1] = amax
        _nearest_codes(tail / amax, codes[full:])
    return codes, absmax


@cache
def _dynamic_grid_table(device: torch.device) -> torch.Tensor:
    """[65536] int64: for each point ``-1 + 2i/65535`` of a grid on [-1, 1], its nearest dynamic code."""
    code = dynamic_code(device)
    midpoints = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_GRID, device=device, dtype=torch.float32)) / (_GRID - 1)
    return torch.searchsorted(midpoints, grid, side="left")


def _quantize_8bit_blockwise(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit dynamic-code quantization of the block scales, in blocks of 256 (double quantization).

    bitsandbytes (the byte-equality reference) snaps ``value * (1/absmax)`` to a 65536-point grid on
    [-1, 1] and stores the code nearest to that grid point, and an all-zero block gets code 0. The
    result can differ from the exact nearest code near midpoints, so the same steps are taken here.
    """
    n = values.numel()
    blocks = math.ceil(n / NESTED_BLOCKSIZE)
    padded = torch.zeros(blocks * NESTED_BLOCKSIZE, dtype=torch.float32, device=values.device)
    padded[:n] = values
    padded = padded.view(blocks, NESTED_BLOCKSIZE)
    absmax = padded.abs().amax(dim=1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    normed = (padded * inv.unsqueeze(1)).clamp_(-1.0, 1.0)
    grid_index = ((normed + 1.0) * 0.5 * (_GRID - 1) + 0.5).to(torch.int64)
    codes = _dynamic_grid_table(values.device)[grid_index]
    codes[absmax == 0] = 0
    return codes.view(-1)[:n].to(torch.uint8), absmax


class NF4Weight(QuantizedWeight):
    """A weight in NF4, optionally with double-quantized (8-bit) block scales."""

    format = "nf4"

    def __init__(
        self,
        packed: torch.Tensor,
        absmax: torch.Tensor,
        shape: tuple[int, ...] | torch.Size,
        dtype: torch.dtype,
        blocksize: int = 64,
        nested_absmax: torch.Tensor | None = None,
        nested_code: torch.Tensor | None = None,
        offset: float | None = None,
    ):
        self.packed = packed.reshape(-1)
        self.absmax = absmax.reshape(-1)
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.offset = offset
        _validate(self)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"packed": self.packed, "absmax": self.absmax}
        if self.double_quant:
            out["nested_absmax"] = self.nested_absmax
            out["nested_code"] = self.nested_code
        return out

    def with_tensors(self, tensors: dict[str, torch.Tensor]) -> NF4Weight:
        nested = (tensors["nested_absmax"], tensors["nested_code"]) if self.double_quant else (None, None)
        return NF4Weight(
            tensors["packed"], tensors["absmax"], self.shape, self.dtype, self.blocksize, *nested, self.offset
        )

    def block_scales(self) -> torch.Tensor:
        """fp32 absmax per block, undoing double quantization when present."""
        if not self.double_quant:
            return self.absmax
        idx = torch.arange(self.absmax.numel(), device=self.absmax.device) // NESTED_BLOCKSIZE
        return self.nested_code[self.absmax.int()] * self.nested_absmax[idx] + self.offset

    def rows(self, start: int, stop: int) -> NF4Weight:
        """Rows ``start:stop`` (their elements must start and end on block boundaries). Double-quantized scales
        come back as the plain fp32 scales of those blocks (nested blocks need not align with the rows)."""
        cols = self.shape[1]
        first, last = start * cols, stop * cols
        if len(self.shape) != 2 or first % self.blocksize or last % self.blocksize:
            raise NibbleError(
                f"rows {start}:{stop} of a {tuple(self.shape)} NF4 weight do not start and end on its "
                f"{self.blocksize}-element blocks"
            )
        blocks = slice(first // self.blocksize, last // self.blocksize)
        if self.double_quant:
            index = torch.arange(blocks.start, blocks.stop, device=self.absmax.device)
            scales = self.nested_code[self.absmax[blocks].int()] * self.nested_absmax[index // NESTED_BLOCKSIZE]
            absmax = scales + self.offset
        else:
            absmax = self.absmax[blocks]
        return NF4Weight(self.packed[first // 2 : last // 2], absmax, (stop - start, cols), self.dtype, self.blocksize)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in ``dtype`` and its original shape (computed in fp32, as bitsandbytes does)."""
        n = self.numel
        values = decode_codes(self.packed)  # [>= n] fp32
        scales = self.block_scales()
        full = n - n % self.blocksize
        values[:full].view(-1, self.blocksize).mul_(scales[: full // self.blocksize, None])
        if full < n:
            values[full:n].mul_(scales[-1])
        return values[:n].view(self.shape).to(dtype)

    def state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """Tensors in bitsandbytes' serialized layout (``weight``, ``weight.absmax``, ...)."""
        meta: dict[str, object] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        sd = {
            prefix: self.packed.view(-1, 1),
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": nf4_code(self.packed.device).clone(),
        }
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = self.nested_code
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_offset=self.offset, nested_dtype="float32")
        blob = json.dumps(meta).encode("utf-8")
        sd[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, torch.Tensor], prefix: str = "weight", source: str = "state dict"
    ) -> NF4Weight:
        """Read bitsandbytes' serialized layout; ``source`` names the file in error messages."""
        meta_key = f"{prefix}.quant_state.bitsandbytes__nf4"
        for key in (prefix, f"{prefix}.absmax", meta_key):
            if key not in sd:
                raise NibbleError(f"{source}: missing tensor '{key}' of a bitsandbytes NF4 weight")
        try:
            meta = json.loads(bytes(sd[meta_key].to("cpu", torch.uint8).tolist()).decode("utf-8"))
            shape = tuple(int(s) for s in meta["shape"])
            blocksize = int(meta["blocksize"])
            dtype = getattr(torch, meta.get("dtype", "float32"))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise NibbleError(f"{source}: '{meta_key}' is not a valid quant-state JSON object ({exc})") from None
        if meta.get("quant_type", "nf4") != "nf4":
            raise NibbleError(f"{source}: '{prefix}' is {meta.get('quant_type')}, only nf4 is supported")
        if f"{prefix}.quant_map" in sd and not torch.equal(sd[f"{prefix}.quant_map"].float().cpu(), nf4_code()):
            raise NibbleError(f"{source}: '{prefix}.quant_map' is not the NF4 codebook")
        nested = (None, None, None)
        if "nested_offset" in meta:
            for key in (f"{prefix}.nested_absmax", f"{prefix}.nested_quant_map"):
                if key not in sd:
                    raise NibbleError(f"{source}: missing tensor '{key}' of a double-quantized NF4 weight")
            if int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
                raise NibbleError(f"{source}: '{prefix}' nested blocksize must be {NESTED_BLOCKSIZE}")
            nested = (
                sd[f"{prefix}.nested_absmax"].float(),
                sd[f"{prefix}.nested_quant_map"].float(),
                float(meta["nested_offset"]),
            )
        try:
            return cls(sd[prefix].view(torch.uint8), sd[f"{prefix}.absmax"], shape, dtype, blocksize, *nested)
        except NibbleError as exc:
            raise NibbleError(f"{source}: '{prefix}': {exc}") from None


def _validate(w: NF4Weight) -> None:
    if w.blocksize not in VALID_BLOCKSIZES:
        raise NibbleError(f"blocksize {w.blocksize} is not supported; use one of {VALID_BLOCKSIZES}")
    n = w.numel
    if w.packed.dtype != torch.uint8 or w.packed.numel() != math.ceil(n / 2):
        raise NibbleError(f"packed data must be {math.ceil(n / 2)} uint8 bytes for shape {tuple(w.shape)}")
    blocks = math.ceil(n / w.blocksize)
    if w.absmax.numel() != blocks:
        raise NibbleError(f"absmax must hold {blocks} values for shape {tuple(w.shape)}, not {w.absmax.numel()}")
    if w.double_quant:
        if w.absmax.dtype != torch.uint8 or w.offset is None or w.nested_code.numel() != 256:
            raise NibbleError("double-quantized absmax needs uint8 codes, a 256-entry code and an offset")
        if w.nested_absmax.numel() != math.ceil(blocks / NESTED_BLOCKSIZE):
            raise NibbleError(f"nested_absmax must hold {math.ceil(blocks / NESTED_BLOCKSIZE)} values")
    elif w.absmax.dtype != torch.float32:
        raise NibbleError(f"absmax must be float32, not {w.absmax.dtype}")


def quantize(weight: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantize a fp32/fp16/bf16 tensor of any shape to NF4, byte-identical to bitsandbytes.

    Raises:
        NibbleError: non-float dtype, NaN/inf values, empty tensor or unsupported blocksize.
    """
    check_weight(weight)
    if blocksize not in VALID_BLOCKSIZES:
        raise NibbleError(f"blocksize {blocksize} is not supported; use one of {VALID_BLOCKSIZES}")
    flat = weight.detach().reshape(-1).float()
    codes, absmax = _blockwise_codes(flat, blocksize)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_full((1,), 7)])
    pairs = codes.view(-1, 2)
    packed = (pairs[:, 0] << 4) | pairs[:, 1]
    return _with_scales(packed, absmax, weight.shape, weight.dtype, blocksize, double_quant)


def join_rows(parts: list[NF4Weight], double_quant: bool = False) -> NF4Weight:
    """2-D weights with plain scales and the same columns, each a whole number of blocks, as one weight of all
    their rows: the bytes :func:`quantize` gives their concatenation (scales double-quantized when asked)."""
    first = parts[0]
    cols = first.shape[1]
    for part in parts:
        if part.double_quant or len(part.shape) != 2 or part.shape[1] != cols or part.numel % first.blocksize:
            raise NibbleError("NF4 weights join by rows only when 2-D, of equal columns, whole blocks and plain scales")
    packed = torch.cat([p.packed for p in parts])
    absmax = torch.cat([p.absmax for p in parts])
    rows = sum(p.shape[0] for p in parts)
    return _with_scales(packed, absmax, (rows, cols), first.dtype, first.blocksize, double_quant)


def _with_scales(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
    blocksize: int,
    double_quant: bool,
) -> NF4Weight:
    """The NF4 weight of ``packed`` codes and fp32 ``absmax``, its scales double-quantized when asked."""
    if not double_quant:
        return NF4Weight(packed, absmax, shape, dtype, blocksize)
    offset = absmax.mean()
    nested_codes, nested_absmax = _quantize_8bit_blockwise(absmax - offset)
    return NF4Weight(
        packed, nested_codes, shape, dtype, blocksize, nested_absmax, dynamic_code(packed.device).clone(), float(offset)
    )
