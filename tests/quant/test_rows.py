"""A weight's rows as a weight of their own, and weights joined by rows: how a layer's experts are one weight."""

from __future__ import annotations

import pytest
import torch

from nibble.errors import NibbleError
from nibble.quant import QuantSpec, quantize, quantize_rows


@pytest.mark.parametrize(
    "spec", [QuantSpec("nf4"), QuantSpec("nf4", double_quant=True), QuantSpec("int4", group_size=64)], ids=str
)
def test_quantize_rows_equals_quantizing_the_concatenation(spec):
    parts = [torch.randn(rows, 128) for rows in (6, 2, 8)]
    joined = quantize_rows(iter(parts), spec)
    whole = quantize(torch.cat(parts), spec)
    for name, tensor in whole.tensors().items():
        assert torch.equal(joined.tensors()[name], tensor), name
    dense = whole.dequantize()
    assert torch.equal(joined.rows(6, 8).dequantize(), dense[6:8])
    assert torch.equal(joined.rows(8, 16).dequantize(), dense[8:16])


def test_nf4_rows_must_be_whole_blocks():
    weight = quantize(torch.randn(8, 32), "nf4")
    with pytest.raises(NibbleError, match="64-element blocks"):
        weight.rows(1, 3)
    with pytest.raises(NibbleError, match="whole number of 64-element NF4 blocks"):
        quantize_rows([torch.randn(1, 32)], "nf4")
