"""QuantLinear: dense-equivalent forward, input-only gradients, autocast, caching."""

import pytest
import torch
import torch.nn.functional as F

from nibble import kernels
from nibble.errors import NibbleError
from nibble.nn import QuantLinear, quant_linear
from nibble.nn.quant_linear import (
    DEQUANTIZE_WORKSPACE,
    auto_cache_budget,
    cache_budget_bytes,
    cache_dense_weights,
    frozen_weights,
)
from nibble.quant import QuantSpec

FORMATS = [
    ("nf4", {"blocksize": 64}),
    ("nf4", {"blocksize": 64, "double_quant": True}),
    ("int4", {"group_size": 64}),
]


def make_layer(fmt, options, bias=True, out_features=45, in_features=128, **extra):
    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) * 0.1
    b = torch.randn(out_features) if bias else None
    return QuantLinear.from_dense(weight, b, QuantSpec(fmt, **options), **extra)


@pytest.mark.parametrize("fmt,options", FORMATS)
@pytest.mark.parametrize("lead", [(1,), (3,), (2, 7)])
def test_forward_equals_dense_matmul_with_dequantized_weight(fmt, options, lead):
    layer = make_layer(fmt, options)
    x = torch.randn(*lead, 128)
    expected = F.linear(x, layer.dequantize(), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("fmt,options", FORMATS)
def test_input_gradient_passes_gradcheck(fmt, options):
    layer = make_layer(fmt, options, out_features=6, in_features=64)
    x = torch.randn(3, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("fmt,options", FORMATS)
def test_weight_never_gets_a_gradient(fmt, options):
    layer = make_layer(fmt, options)
    assert list(layer.parameters()) == []
    x = torch.randn(4, 128, requires_grad=True)
    layer(x).pow(2).sum().backward()
    w = layer.dequantize().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    F.linear(x2, w, layer.bias).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)


def test_autocast_bf16_computes_in_bf16():
    layer = make_layer("nf4", {})
    x = torch.randn(5, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    reference = F.linear(x.bfloat16(), layer.dequantize(torch.bfloat16), layer.bias.bfloat16())
    torch.testing.assert_close(y, reference)
    y.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_gives_identical_results(dtype):
    plain = make_layer("nf4", {"double_quant": True})
    cached = make_layer("nf4", {"double_quant": True}, cache_dequantized=True)
    outs, grads = [], []
    for layer in (plain, cached):
        x = torch.randn(3, 128, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(True)
        y = layer(x)
        y.float().pow(2).sum().backward()
        outs.append(y)
        grads.append(x.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])
    assert dtype in cached._cache
    cached.clear_cache()
    assert not cached._cache


def test_module_dtype_cast_keeps_the_4bit_weight_intact():
    layer = make_layer("nf4", {})
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.qweight.absmax.dtype == torch.float32 and layer.qweight.packed.dtype == torch.uint8
    assert torch.equal(layer.dequantize(), before)
    assert layer.bias.dtype == torch.bfloat16


def test_state_dict_uses_bitsandbytes_layout():
    sd = make_layer("nf4", {"double_quant": True}).state_dict()
    assert {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "bias"} <= set(sd)
    assert "weight.quant_state.bitsandbytes__nf4" in sd
    sd4 = make_layer("int4", {"group_size": 64}, bias=False).state_dict(prefix="model.up_proj.")
    assert set(sd4) == {"model.up_proj.weight_4bit", "model.up_proj.scales_4bit"}


def test_errors():
    layer = make_layer("nf4", {})
    with pytest.raises(NibbleError, match="128 features, got 64"):
        layer(torch.randn(2, 64))
    with pytest.raises(NibbleError, match="2-D"):
        QuantLinear.from_dense(torch.randn(64))
    with pytest.raises(NibbleError, match="unknown quantization format 'fp8'"):
        QuantLinear.from_dense(torch.randn(4, 64), spec="fp8")
    with pytest.raises(NibbleError, match=r"bias must have shape \(4,\)"):
        QuantLinear.from_dense(torch.randn(4, 64), torch.randn(5))


def test_kernel_choice_is_validated(monkeypatch):
    layer = make_layer("nf4", {})
    with pytest.raises(NibbleError, match="kernel backend 'cuda-magic' is not valid"):
        kernels.set_backend("cuda-magic")
    with kernels.use_backend(None):  # forget the choice: NIBBLE_KERNELS is read afresh at the next matmul
        monkeypatch.setenv("NIBBLE_KERNELS", "cuda-magic")
        with pytest.raises(NibbleError, match="NIBBLE_KERNELS='cuda-magic' is not valid"):
            layer(torch.randn(1, 128))
        monkeypatch.setenv("NIBBLE_KERNELS", "torch")  # an invalid value is not kept
        assert layer(torch.randn(1, 128)).shape == (1, 45)
    with kernels.use_backend("torch"):
        assert layer(torch.randn(1, 128)).shape == (1, 45)


def test_dense_copies_fill_the_budget_in_model_order():
    model = torch.nn.Sequential(*(make_layer("nf4", {}, out_features=16) for _ in range(3)))
    one = 16 * 128 * 4  # bytes of one fp32 copy
    assert cache_dense_weights(model, 2 * one + one // 2, torch.float32) == (2, 3, 2 * one)
    assert [layer.cache_dequantized for layer in model] == [True, True, False]
    x = torch.randn(2, 128)
    expected = [F.linear(x, layer.dequantize(), layer.bias) for layer in model]
    assert all(torch.equal(layer(x), want) for layer, want in zip(model, expected, strict=True))
    assert [bool(layer._cache) for layer in model] == [True, True, False]
    assert cache_dense_weights(model, 0, torch.float32) == (0, 3, 0)
    assert not any(layer.cache_dequantized or layer._cache for layer in model)  # copies are dropped


def test_the_default_budget_keeps_a_4bit_base_within_the_dense_one_on_cpu_and_is_zero_on_gpus(monkeypatch):
    formats = ("nf4", "int4", "nf4", "nf4", "nf4", "nf4")
    model = torch.nn.Sequential(*(make_layer(name, {}, out_features=64) for name in formats))
    weights = frozen_weights(model)
    assert [(w.out_features, w.in_features, w.format) for w in weights] == [(64, 128, f) for f in formats]
    assert [w.packed_bytes for w in weights] == [layer.qweight.memory_bytes() for layer in model]
    one = 64 * 128 * 4  # one fp32 copy
    dense = len(formats) * one
    packed = sum(w.packed_bytes for w in weights)
    workspace = 64 * 128 * DEQUANTIZE_WORKSPACE["int4"]  # the largest: INT4's
    budget = cache_budget_bytes(model, torch.float32)
    assert budget == auto_cache_budget(weights, torch.float32, torch.device("cpu")) == dense - packed - workspace
    cached, _, used = cache_dense_weights(model, budget, torch.float32)
    assert packed + used + workspace <= dense and cached == budget // one >= 1  # one more would exceed the dense base
    assert auto_cache_budget(weights, torch.bfloat16, torch.device("cpu")) == max(dense // 2 - packed - workspace, 0)
    for accelerator in ("cuda", "xpu", "mps"):  # the 4-bit saving is the point there, and the kernels are fused
        assert auto_cache_budget(weights, torch.bfloat16, torch.device(accelerator)) == 0
    assert cache_budget_bytes(model, torch.float32, budget_mb=3) == 3 * 2**20  # an explicit budget is kept
    monkeypatch.setattr(quant_linear, "memory_available_bytes", lambda: 2 * one)  # little memory left
    assert cache_budget_bytes(model, torch.float32) == one  # half of what is available


@pytest.mark.parametrize(
    "fmt,options,out_features,in_features",
    [
        ("nf4", {"blocksize": 64}, 45, 128),
        ("nf4", {"blocksize": 64, "double_quant": True}, 45, 128),
        ("nf4", {"blocksize": 64}, 3, 37),  # blocks that straddle rows: the bytes are held unsplit by row
        ("int4", {"group_size": 64}, 45, 128),
        ("gguf", {}, 6, 256),
    ],
)
def test_held_parameters_rebuild_exactly_the_weight_and_are_never_cast(fmt, options, out_features, in_features):
    """For FSDP2: the 4-bit tensors held as uint8 parameters, output rows first, rebuild the very same weight;
    a shard of the rows (what a rank keeps) is whole blocks of those rows; Module.to(dtype) casts nothing."""
    from nibble.quant import gguf

    torch.manual_seed(0)
    weight = torch.randn(out_features, in_features) * 0.1
    if fmt == "gguf":
        layer = QuantLinear(gguf.quantize(weight, "Q4_K"))
    else:
        layer = QuantLinear.from_dense(weight, None, QuantSpec(fmt, **options), cache_dequantized=True)
    before = {name: t.clone() for name, t in layer.qweight.tensors().items()}
    dense = layer.dequantize()
    x = torch.randn(5, in_features, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    grad = x.grad.clone()

    layer.hold_as_parameters()
    held = dict(layer.named_parameters())
    assert sorted(held) == sorted(f"held_{name}" for name in before)
    assert all(p.dtype == torch.uint8 and not p.requires_grad for p in held.values())
    rows_split = fmt != "nf4" or in_features % options["blocksize"] == 0
    assert (held["held_packed"].shape[0] == out_features) == rows_split
    assert layer.cache_dequantized is False and layer.cached_weight(torch.float32) is None
    rebuilt = layer.qweight.tensors()
    assert rebuilt.keys() == before.keys()
    for name, t in before.items():
        assert rebuilt[name].dtype == t.dtype and torch.equal(rebuilt[name], t), name
    torch.testing.assert_close(layer.dequantize(), dense, rtol=0, atol=0)
    x.grad = None
    y2 = layer(x)
    y2.sum().backward()
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, grad, rtol=0, atol=0)
    if rows_split and fmt != "gguf" and not options.get("double_quant"):
        # the first rows' bytes and scales are those rows' own (whole blocks; double quantization's codes depend
        # on every scale, so not that one)
        top = QuantLinear.from_dense(weight[:2], None, QuantSpec(fmt, **options)).qweight.tensors()
        for name, t in top.items():
            assert torch.equal(held[f"held_{name}"][:2].flatten(), t.contiguous().view(torch.uint8).flatten()), name

    layer.to(torch.bfloat16)
    assert all(p.dtype == torch.uint8 for p in layer.parameters())
    torch.testing.assert_close(layer.dequantize(), dense, rtol=0, atol=0)
    with pytest.raises(NibbleError, match="holds its 4-bit tensors as parameters"):
        layer.qweight = layer.qweight
