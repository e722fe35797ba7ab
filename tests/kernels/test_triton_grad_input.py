"""Fused grad-input (dY @ dequant(W)) vs the reference, over formats, dtypes and shapes off the tile grid."""

import pytest
import torch

from nibble.errors import NibbleError
from nibble.kernels import reference, triton_grad_input, triton_ops
from nibble.quant import nf4

NAMES = ["nf4", "nf4-dq", "nf4-bs32", "nf4-unaligned", "int4-g32", "int4-g128"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_grad_input_matches_reference(make_weight, close, device, name, dtype, m):
    qweight, _ = make_weight(name)
    grad_y = torch.randn(m, qweight.shape[0], generator=torch.Generator().manual_seed(m)).to(device, dtype)
    close(triton_ops.matmul_grad_input(grad_y, qweight), reference.matmul_grad_input(grad_y, qweight))


def test_many_output_rows_and_fp16(close, device):
    # N = 161 spans several N tiles, so the split-N and large-M loops both take more than one step
    weight = torch.randn(161, 64, generator=torch.Generator().manual_seed(5))
    qweight = nf4.quantize(weight, double_quant=True).to(device)
    for m in (2, 33):
        grad_y = torch.randn(m, 161, device=device).to(torch.float16)
        close(triton_grad_input.matmul_grad_input(grad_y, qweight), reference.matmul_grad_input(grad_y, qweight))


def test_strided_grad(make_weight, close, device):
    qweight, _ = make_weight("int4-g128")
    grad_y = torch.randn(qweight.shape[0], 19, device=device).t()  # [19, N], column-major
    close(triton_grad_input.matmul_grad_input(grad_y, qweight), reference.matmul_grad_input(grad_y, qweight))


def test_float64_grad_accumulates_in_float64(make_weight, close, device):
    qweight, _ = make_weight("nf4-dq")
    for m in (2, 33):  # split-N path and large-M path
        grad_y = torch.randn(m, qweight.shape[0], dtype=torch.float64, device=device)
        close(triton_grad_input.matmul_grad_input(grad_y, qweight), reference.matmul_grad_input(grad_y, qweight))


def test_odd_in_features_fall_back_to_dense_weight(close, device):
    qweight = nf4.quantize(torch.randn(7, 33, generator=torch.Generator().manual_seed(2))).to(device)
    grad_y = torch.randn(4, 7, device=device)
    close(triton_grad_input.matmul_grad_input(grad_y, qweight), reference.matmul_grad_input(grad_y, qweight))


def test_wrong_grad_width_is_rejected(make_weight, device):
    qweight, _ = make_weight("nf4")
    with pytest.raises(NibbleError, match=r"matmul_grad_input expects grad_y of shape \[M, 45\]"):
        triton_grad_input.matmul_grad_input(torch.randn(2, qweight.shape[0] + 1, device=device), qweight)
