"""Dispatch to the Triton kernels, and QuantLinear giving the same results and input gradients through both."""

import pytest
import torch

from nibble import kernels
from nibble.errors import NibbleError
from nibble.kernels import triton_ops
from nibble.nn import QuantLinear
from nibble.quant import int4, nf4

LAYERS = [
    (nf4.quantize, {"blocksize": 64}),
    (nf4.quantize, {"blocksize": 64, "double_quant": True}),
    (int4.quantize, {"group_size": 64}),
]


def _layer(quantize, options, weight, device, bias=None, **extra):
    return QuantLinear(quantize(weight, **options).to(device), None if bias is None else bias.to(device), **extra)


def test_auto_picks_torch_for_cpu_and_triton_when_forced():
    with kernels.use_backend("auto"):
        assert kernels.backend_name(torch.device("cpu")) == "torch"
        assert kernels.backend_name(torch.device("cuda")) == "triton"
        with kernels.use_backend("triton"):
            assert kernels.backend_name(torch.device("cpu")) == "triton"
        assert kernels.backend_name(torch.device("cpu")) == "torch"  # the previous choice is back


def test_environment_is_read_once_and_set_backend_overrides_it(monkeypatch):
    with kernels.use_backend(None):  # forget any choice: NIBBLE_KERNELS is read at the next use
        monkeypatch.setenv("NIBBLE_KERNELS", " Triton ")
        assert kernels.backend_name(torch.device("cpu")) == "triton"
        monkeypatch.setenv("NIBBLE_KERNELS", "torch")
        assert kernels.backend_name(torch.device("cpu")) == "triton"  # read once
        kernels.set_backend("torch")
        assert kernels.backend_name(torch.device("cpu")) == "torch"
        kernels.set_backend(None)
        assert kernels.backend_name(torch.device("cpu")) == "torch"  # the environment, read again
        with pytest.raises(NibbleError, match="kernel backend 'cuda' is not valid"):
            kernels.set_backend("cuda")
        assert kernels.backend_name(torch.device("cpu")) == "torch"  # a rejected name changes nothing


@pytest.mark.parametrize("quantize,options", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_linear_same_output_and_input_grad_through_both_paths(close, device, quantize, options, dtype):
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(37, 128, generator=generator) * 0.1, torch.randn(37, generator=generator)
    layer = _layer(quantize, options, weight, device, bias)
    x = torch.randn(2, 9, 128, generator=generator).to(device, dtype)
    upstream = torch.randn(2, 9, 37, generator=generator).to(device, dtype)
    results = {}
    for backend in ("torch", "triton"):
        with kernels.use_backend(backend):
            xb = x.clone().requires_grad_(True)
            y = layer(xb)
            y.backward(upstream)
        results[backend] = (y.detach(), xb.grad)
    close(results["triton"][0], results["torch"][0])
    close(results["triton"][1], results["torch"][1])


def test_quant_linear_dequantized_cache_uses_the_triton_dequantize(monkeypatch, device):
    layer = _layer(nf4.quantize, {"double_quant": True}, torch.randn(16, 64), device, cache_dequantized=True)
    calls = []
    triton_dequantize = triton_ops.dequantize

    def counting_dequantize(qweight, dtype):
        calls.append(dtype)
        return triton_dequantize(qweight, dtype)

    monkeypatch.setattr(triton_ops, "dequantize", counting_dequantize)
    with kernels.use_backend("triton"):
        cached = layer.cached_weight(torch.bfloat16)
        assert layer.cached_weight(torch.bfloat16) is cached  # built once
    assert calls == [torch.bfloat16]
    assert torch.equal(cached, layer.qweight.dequantize(torch.bfloat16))


@pytest.mark.parametrize("quantize,options", LAYERS)
def test_quant_linear_input_gradient_passes_gradcheck_through_triton(device, quantize, options):
    # fp64 end to end: the kernels accumulate fp64 inputs in fp64, as finite differences need
    generator = torch.Generator().manual_seed(1)
    layer = _layer(quantize, options, torch.randn(6, 64, generator=generator), device)
    x = torch.randn(3, 64, dtype=torch.float64, generator=generator).to(device).requires_grad_(True)
    with kernels.use_backend("triton"):  # on CUDA small M adds split sums atomically, in varying order
        assert torch.autograd.gradcheck(layer, (x,), fast_mode=True, nondet_tol=1e-12)
