"""Dispatch to the Triton kernels, and QuantLinear giving the same results and input gradients through both."""

import pytest
import torch

from nibble import kernels
from nibble.nn import QuantLinear

LAYERS = [
    ("nf4", {"blocksize": 64}),
    ("nf4", {"blocksize": 64, "double_quant": True}),
    ("int4", {"group_size": 64}),
]


def test_auto_picks_torch_for_cpu_and_triton_when_forced(monkeypatch):
    monkeypatch.delenv("NIBBLE_KERNELS", raising=False)
    assert kernels.backend_name(torch.device("cpu")) == "torch"
    monkeypatch.setenv("NIBBLE_KERNELS", "triton")
    assert kernels.backend_name(torch.device("cpu")) == "triton"


@pytest.mark.parametrize("fmt,options", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_same_output_and_input_grad_through_both_paths(monkeypatch, close, fmt, options, dtype):
    generator = torch.Generator().manual_seed(0)
    layer = QuantLinear.from_dense(
        torch.randn(37, 128, generator=generator) * 0.1, torch.randn(37, generator=generator), format=fmt, **options
    )
    x = torch.randn(2, 9, 128, generator=generator).to(dtype)
    upstream = torch.randn(2, 9, 37, generator=generator).to(dtype)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("NIBBLE_KERNELS", backend)
        xb = x.clone().requires_grad_(True)
        y = layer(xb)
        y.backward(upstream)
        results[backend] = (y.detach(), xb.grad)
    close(results["triton"][0], results["torch"][0])
    close(results["triton"][1], results["torch"][1])


def test_quant_linear_dequantized_cache_uses_the_triton_dequantize(monkeypatch):
    monkeypatch.setenv("NIBBLE_KERNELS", "triton")
    layer = QuantLinear.from_dense(torch.randn(16, 64), format="nf4", double_quant=True, cache_dequantized=True)
    assert torch.equal(layer.cached_weight(torch.bfloat16), layer.qweight.dequantize(torch.bfloat16))


@pytest.mark.parametrize("fmt,options", LAYERS)
def test_quant_linear_input_gradient_passes_gradcheck_through_triton(monkeypatch, fmt, options):
    # fp64 end to end: the kernels accumulate fp64 inputs in fp64, as finite differences need
    monkeypatch.setenv("NIBBLE_KERNELS", "triton")
    generator = torch.Generator().manual_seed(1)
    layer = QuantLinear.from_dense(torch.randn(6, 64, generator=generator), format=fmt, **options)
    x = torch.randn(3, 64, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)
