"""Fused dequantize+GEMM forward vs the reference, over formats, dtypes and shapes off the tile grid."""

import pytest
import torch

from nibble.errors import NibbleError
from nibble.kernels import reference, triton_gemm, triton_ops
from nibble.quant import nf4

NAMES = ["nf4", "nf4-dq", "nf4-bs32", "nf4-unaligned", "int4-g32", "int4-g128"]
M_VALUES = [1, 3, 17, 64]  # 1 and 3 take the split-K (decode) path, 17 and 64 the large-M path


def _inputs(m, k, n, dtype, device, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=generator).to(device, dtype)
    bias = torch.randn(n, generator=generator).to(device)
    return x, bias


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", M_VALUES)
def test_forward_matches_reference(make_weight, close, device, name, dtype, m):
    qweight, k = make_weight(name)
    x, bias = _inputs(m, k, qweight.shape[0], dtype, device)
    close(triton_ops.matmul(x, qweight, bias), reference.matmul(x, qweight, bias))


@pytest.mark.parametrize("m", [3, 64])
def test_forward_without_bias_in_fp16(make_weight, close, device, m):
    qweight, k = make_weight("nf4-dq")
    x, _ = _inputs(m, k, qweight.shape[0], torch.float16, device, seed=1)
    close(triton_gemm.matmul(x, qweight), reference.matmul(x, qweight))


def test_strided_input(make_weight, close, device):
    qweight, k = make_weight("int4-g32")
    wide = torch.randn(2 * k, 20, device=device).t()  # [20, 2k], rows strided by 1 and columns by 20
    x = wide[:, ::2]
    assert not x.is_contiguous()
    close(triton_gemm.matmul(x, qweight), reference.matmul(x, qweight))


def test_float64_accumulates_in_float64(make_weight, close, device):
    qweight, k = make_weight("nf4")
    for m in (5, 20):  # split-K path and large-M path
        x = torch.randn(m, k, dtype=torch.float64, device=device)
        bias = torch.randn(qweight.shape[0], dtype=torch.float64, device=device)
        close(triton_gemm.matmul(x, qweight, bias), reference.matmul(x, qweight, bias))


def test_odd_in_features_fall_back_to_dense_weight(close, device):
    # 33 columns: rows start mid-byte, so the fused kernel does not apply; the result must still be right
    qweight = nf4.quantize(torch.randn(7, 33, generator=torch.Generator().manual_seed(2))).to(device)
    x = torch.randn(4, 33, device=device)
    bias = torch.randn(7, device=device)
    close(triton_gemm.matmul(x, qweight, bias), reference.matmul(x, qweight, bias))


def test_empty_batch(make_weight, device):
    qweight, k = make_weight("nf4")
    assert triton_gemm.matmul(torch.randn(0, k, device=device), qweight).shape == (0, qweight.shape[0])


def test_wrong_input_width_is_rejected(make_weight, device):
    qweight, k = make_weight("nf4")
    with pytest.raises(NibbleError, match=f"matmul expects x of shape \\[M, {k}\\]"):
        triton_gemm.matmul(torch.randn(2, k + 2, device=device), qweight)
