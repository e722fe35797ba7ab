"""4-bit weight formats: NF4 (bitsandbytes-compatible) and group-wise INT4, named by a QuantSpec."""

import torch

from nibble.quant import int4, nf4
from nibble.quant.base import QuantizedWeight
from nibble.quant.int4 import INT4Weight
from nibble.quant.nf4 import NF4Weight
from nibble.quant.spec import FORMATS, QuantSpec


def quantize(weight: torch.Tensor, spec: QuantSpec | str = "nf4") -> QuantizedWeight:
    """Quantize ``weight`` as ``spec`` says (a QuantSpec, or a format name with its default parameters)."""
    spec = QuantSpec.of(spec)
    if spec.format == "nf4":
        return nf4.quantize(weight, blocksize=spec.blocksize, double_quant=spec.double_quant)
    return int4.quantize(weight, group_size=spec.group_size)


__all__ = ["FORMATS", "INT4Weight", "NF4Weight", "QuantSpec", "QuantizedWeight", "int4", "nf4", "quantize"]
