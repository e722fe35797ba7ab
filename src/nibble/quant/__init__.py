"""Frozen weight formats: NF4 (bitsandbytes-compatible), group-wise INT4, and GGUF's block types, named by a
QuantSpec."""

import torch

from nibble.errors import NibbleError
from nibble.quant import gguf, int4, nf4
from nibble.quant.base import QuantizedWeight
from nibble.quant.gguf import GGUFWeight
from nibble.quant.int4 import INT4Weight
from nibble.quant.nf4 import NF4Weight
from nibble.quant.spec import FORMATS, QuantSpec


def quantize(weight: torch.Tensor, spec: QuantSpec | str = "nf4") -> QuantizedWeight:
    """Quantize ``weight`` as ``spec`` says (a QuantSpec, or a format name with its default parameters).

    Raises:
        NibbleError: the ``gguf`` format, which keeps a file's own blocks rather than quantizing (use
            :func:`nibble.quant.gguf.quantize` with a block type).
    """
    spec = QuantSpec.of(spec)
    if spec.format == "nf4":
        return nf4.quantize(weight, blocksize=spec.blocksize, double_quant=spec.double_quant)
    if spec.format == "gguf":
        raise NibbleError("format 'gguf' keeps the blocks a .gguf file stores; load the .gguf file as the model")
    return int4.quantize(weight, group_size=spec.group_size)


__all__ = [
    "FORMATS",
    "GGUFWeight",
    "INT4Weight",
    "NF4Weight",
    "QuantSpec",
    "QuantizedWeight",
    "gguf",
    "int4",
    "nf4",
    "quantize",
]
