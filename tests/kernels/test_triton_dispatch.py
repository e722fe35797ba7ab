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


def test_the_crossover_sends_training_sizes_to_dequantize_then_matmul():
    crossover = triton_ops.DENSE_FROM_ROWS
    assert [triton_ops.dequantize_then_matmul(m) for m in (1, 16, crossover - 1)] == [False] * 3
    assert [triton_ops.dequantize_then_matmul(m) for m in (crossover, 4096, 65536)] == [True] * 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [23, 24, 40])
def test_dequantize_then_matmul_equals_the_fused_kernels_and_the_reference(close, monkeypatch, device, rows, dtype):
    """From DENSE_FROM_ROWS rows (lowered to 24 here, to keep the interpreter fast) the Triton backend dequantizes
    (its dequantize kernel, into a reused temporary) and calls the dense matmul, forward and grad-input; below it
    the fused kernels run. Both paths give the fused kernels' results and the reference's."""
    from nibble.kernels import triton_gemm, triton_grad_input

    monkeypatch.setattr(triton_ops, "DENSE_FROM_ROWS", 24)
    calls = []
    fused = {}
    for module, name in ((triton_gemm, "matmul"), (triton_grad_input, "matmul_grad_input")):
        fused[name] = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, f=fused[name], n=name: calls.append(n) or f(*a))
    generator = torch.Generator().manual_seed(3)
    qweight = nf4.quantize(torch.randn(45, 128, generator=generator) * 0.1, blocksize=64).to(device)
    x = torch.randn(rows, 128, generator=generator).to(device, dtype)
    grad_y = torch.randn(rows, 45, generator=generator).to(device, dtype)
    with kernels.use_backend("triton"):
        y, dx = kernels.matmul(x, qweight), kernels.matmul_grad_input(grad_y, qweight)
        y2 = kernels.matmul(x * 2, qweight)  # the temporary is refilled, the first result untouched
    dense = rows >= 24
    assert calls == ([] if dense else ["matmul", "matmul_grad_input", "matmul"])
    close(y, fused["matmul"](x, qweight))
    close(dx, fused["matmul_grad_input"](grad_y, qweight))
    close(y, kernels.reference.matmul(x, qweight))
    close(dx, kernels.reference.matmul_grad_input(grad_y, qweight))
    close(y2, kernels.reference.matmul(x * 2, qweight))


def test_an_old_broken_or_missing_triton_falls_back_to_the_reference_with_one_note(monkeypatch, capsys):
    import builtins
    import sys
    import types

    assert kernels.version_tuple("3.3.0+git1a2b") == (3, 3, 0) and kernels.version_tuple("3.4.0rc1") == (3, 4, 0)
    assert kernels.triton_unavailable() is None  # the installed Triton runs the kernels
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the note is for CUDA machines
    real_import = builtins.__import__
    kernels._triton_ops.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="2.3.1"))
        assert "Triton 2.3.1 is older than the 3.0" in kernels.triton_unavailable()
        with kernels.use_backend("auto"):
            assert kernels.backend_name(torch.device("cuda")) == "torch"
            assert kernels.backend_name(torch.device("cuda")) == "torch"
        with kernels.use_backend("triton"), pytest.raises(NibbleError, match="NIBBLE_KERNELS=triton but Triton 2.3"):
            kernels.backend_name(torch.device("cpu"))
        assert capsys.readouterr().err.count("note: Triton 2.3.1 is older") == 1  # one note, at the first use

        def broken(name, *args, **kwargs):  # an install whose import raises something other than ImportError
            if name == "triton":
                raise RuntimeError("libcuda.so.1: cannot open shared object file\nmore")
            return real_import(name, *args, **kwargs)

        monkeypatch.delitem(sys.modules, "triton")
        monkeypatch.setattr(builtins, "__import__", broken)
        assert kernels.triton_unavailable() == (
            "Triton does not import (RuntimeError: libcuda.so.1: cannot open shared object file)"
        )
        monkeypatch.setattr(builtins, "__import__", real_import)
        monkeypatch.setitem(sys.modules, "triton", None)  # an import of it fails
        assert kernels.triton_unavailable() == "Triton is not installed (pip install triton)"
        monkeypatch.undo()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setitem(sys.modules, "nibble.kernels.triton_ops", None)  # Triton imports, the kernels do not
        kernels._triton_ops.cache_clear()
        with kernels.use_backend("auto"):
            assert kernels.backend_name(torch.device("cuda")) == "torch"
        assert "note: nibble's Triton kernels do not load (ModuleNotFoundError" in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        kernels._triton_ops.cache_clear()


def test_the_interpreter_setting_is_read_from_knobs_only_where_triton_has_them(monkeypatch):
    import types

    from nibble.kernels.triton_common import interpreting

    old = types.SimpleNamespace(__version__="3.2.0")  # no triton.knobs
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting(old) is True
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert interpreting(old) is False
    new = types.SimpleNamespace(knobs=types.SimpleNamespace(runtime=types.SimpleNamespace(interpret=True)))
    assert interpreting(new) is True  # the knob wins over the variable
