"""``QuantSpec``: the one value that names a 4-bit format and its parameters."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from nibble.errors import NibbleError

FORMATS = ("nf4", "int4", "gguf")
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INT4_GROUP_SIZES = (32, 64, 128, 256)


def indivisible_group(in_features: int, group_size: int) -> str:
    """The error for an INT4 ``group_size`` that does not divide ``in_features``, naming the fix: the largest group
    size that does, else NF4."""
    fits = [g for g in INT4_GROUP_SIZES if in_features % g == 0]
    fix = f"use --group-size {fits[-1]}" if fits else "no INT4 group size divides it: use --quant-format nf4"
    return f"in_features {in_features} is not divisible by INT4 group_size {group_size}; {fix}"


@dataclass(frozen=True)
class QuantSpec:
    """How frozen weights are stored in 4 bits.

    ``format`` is ``"nf4"`` (bitsandbytes' NormalFloat, ``blocksize`` elements per fp32 absmax,
    optionally ``double_quant``-ized scales), ``"int4"`` (symmetric, one fp16 scale per ``group_size``
    input features) or ``"gguf"`` (the blocks a .gguf file already stores, kept as they are: it names no
    quantizer, only where the base comes from). The parameters of the other formats are carried but unused.

    Raises:
        NibbleError: an unknown format, block size or group size, naming the value.
    """

    format: str = "nf4"
    blocksize: int = 64
    group_size: int = 128
    double_quant: bool = False

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise NibbleError(f"unknown quantization format '{self.format}'; use one of {FORMATS}")
        if self.blocksize not in NF4_BLOCKSIZES:
            raise NibbleError(f"blocksize {self.blocksize} is not supported; use one of {NF4_BLOCKSIZES}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise NibbleError(f"group_size {self.group_size} is not supported; use one of {INT4_GROUP_SIZES}")
        if not isinstance(self.double_quant, bool):
            raise NibbleError(f"double_quant must be true or false, got {self.double_quant!r}")

    @classmethod
    def of(cls, value: QuantSpec | str) -> QuantSpec:
        """``value`` itself, or the default spec of the format it names."""
        return value if isinstance(value, QuantSpec) else cls(value)

    @property
    def name(self) -> str:
        """A short label: ``nf4``, ``nf4+dq`` or ``int4``."""
        return "nf4+dq" if self.format == "nf4" and self.double_quant else self.format

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any, source: str) -> QuantSpec:
        """The spec stored as ``data`` (a JSON object); ``source`` names the file in errors."""
        if not isinstance(data, dict) or set(data) - {"format", "blocksize", "group_size", "double_quant"}:
            raise NibbleError(f"{source}: 'quant' must be an object with format, blocksize, group_size, double_quant")
        try:
            return cls(**data)
        except (TypeError, NibbleError) as exc:
            raise NibbleError(f"{source}: 'quant': {exc}") from None
