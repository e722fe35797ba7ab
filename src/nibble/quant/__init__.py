"""4-bit weight formats: NF4 (bitsandbytes-compatible) and group-wise INT4."""

from nibble.quant import int4, nf4
from nibble.quant.base import QuantizedWeight
from nibble.quant.int4 import INT4Weight
from nibble.quant.nf4 import NF4Weight

FORMATS = ("nf4", "int4")


def quantize(weight, format: str = "nf4", *, blocksize: int = 64, group_size: int = 128, double_quant: bool = False):
    """Quantize ``weight`` in the named format (``blocksize``/``double_quant`` for NF4, ``group_size`` for INT4)."""
    from nibble.errors import NibbleError

    if format == "nf4":
        return nf4.quantize(weight, blocksize=blocksize, double_quant=double_quant)
    if format == "int4":
        return int4.quantize(weight, group_size=group_size)
    raise NibbleError(f"unknown quantization format '{format}'; use one of {FORMATS}")


__all__ = ["FORMATS", "INT4Weight", "NF4Weight", "QuantizedWeight", "int4", "nf4", "quantize"]
