"""Frozen weight formats: NF4 (bitsandbytes-compatible), group-wise INT4, and GGUF's block types, named by a
QuantSpec."""

from collections.abc import Iterable

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


def quantize_rows(parts: Iterable[torch.Tensor], spec: QuantSpec | str = "nf4") -> QuantizedWeight:
    """Quantize 2-D tensors of equal columns one at a time and join them as one weight of all their rows.

    The bytes equal :func:`quantize` of their concatenation (NF4 needs each part to be a whole number of
    blocks), while only one part is ever held in full precision: how a layer's experts, read one by one,
    become one 4-bit weight.

    Raises:
        NibbleError: ``gguf``, no parts, or parts that cannot be joined (see ``nf4.join_rows``).
    """
    spec = QuantSpec.of(spec)
    if spec.format == "nf4":
        pieces = [nf4.quantize(p, blocksize=spec.blocksize) for p in parts]
        if not pieces:
            raise NibbleError("quantize_rows needs at least one tensor")
        for piece in pieces:
            if piece.numel % spec.blocksize:
                raise NibbleError(
                    f"a {list(piece.shape)} part is not a whole number of {spec.blocksize}-element NF4 blocks; "
                    "use a blocksize that divides it or int4"
                )
        return nf4.join_rows(pieces, spec.double_quant)
    pieces = [quantize(p, spec) for p in parts]
    if not pieces:
        raise NibbleError("quantize_rows needs at least one tensor")
    return int4.join_rows(pieces)


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
    "quantize_rows",
]
