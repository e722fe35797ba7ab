"""Triton dequantize kernel: bit-identical to the reference dequantization for every format and dtype."""

import pytest
import torch

from nibble.errors import NibbleError
from nibble.kernels import reference, triton_common, triton_dequant
from nibble.quant import int4, nf4

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("name", ["nf4", "nf4-dq", "nf4-bs32", "nf4-unaligned", "int4-g32", "int4-g128"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_is_bit_exact(make_weight, name, dtype):
    qweight, _ = make_weight(name)
    out = triton_dequant.dequantize(qweight, dtype)
    expected = reference.dequantize(qweight, dtype)
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.equal(out, expected)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_odd_element_count_and_partial_last_block(device, double_quant):
    # 5 x 13 = 65 elements: the last byte holds one element and the last block only 1 of 64
    weight = torch.randn(5, 13, generator=torch.Generator().manual_seed(3))
    qweight = nf4.quantize(weight, blocksize=64, double_quant=double_quant).to(device)
    assert torch.equal(triton_dequant.dequantize(qweight, torch.float32), qweight.dequantize(torch.float32))


def test_bf16_rounds_to_nearest_even(device):
    # values whose bf16 rounding differs from truncation: catches a cast that chops mantissa bits
    weight = torch.tensor([[1.0, 1.01171875, -1.01171875, 0.5]]).repeat(1, 16)
    qweight = int4.quantize(weight, group_size=64).to(device)
    out = triton_dequant.dequantize(qweight, torch.bfloat16)
    fp32 = qweight.dequantize(torch.float32)
    assert torch.equal(out, fp32.to(torch.bfloat16))
    assert not torch.equal(out.float(), fp32.view(torch.int32).bitwise_and(-65536).view(torch.float32))


def test_integer_dtype_is_rejected(make_weight):
    qweight, _ = make_weight("nf4")
    with pytest.raises(NibbleError, match="int32"):
        triton_dequant.dequantize(qweight, torch.int32)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    qweight = nf4.quantize(torch.randn(4, 64))  # on CPU, whatever the test device
    monkeypatch.setattr(triton_common, "INTERPRET", False)
    with pytest.raises(NibbleError, match="TRITON_INTERPRET=1"):
        triton_dequant.dequantize(qweight, torch.float32)
