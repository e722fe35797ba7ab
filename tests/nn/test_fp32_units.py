"""bf16 on a CPU without bf16 arithmetic: matmuls and attention run on fp32 units and give what the native bf16
kernels give (bf16 operands, fp32 sums, bf16 results), forward and backward, alone and through a QLoRA model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nibble
from helpers import right_padded_batch
from nibble import kernels
from nibble.kernels import reference
from nibble.nn import apply_lora
from nibble.nn.quant_linear import cache_dense_weights

pytestmark = pytest.mark.cpu_bf16


@pytest.fixture(params=[False, True], ids=["fp32-units", "native"])
def native(request, monkeypatch):
    """Run the test as on a CPU with (True) or without (False) bf16 arithmetic."""
    monkeypatch.setattr(reference, "cpu_has_native_bf16", lambda: request.param)
    return request.param


def test_linear_takes_fp32_units_only_for_low_precision_on_a_cpu_without_bf16(native):
    cpu = torch.device("cpu")
    assert kernels.on_fp32_units(torch.bfloat16, cpu) is not native
    assert kernels.on_fp32_units(torch.float16, cpu) is not native
    assert not kernels.on_fp32_units(torch.float32, cpu)
    assert not kernels.on_fp32_units(torch.bfloat16, torch.device("meta"))


def test_linear_on_fp32_units_equals_native_bf16(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 96, generator=gen).bfloat16().requires_grad_(True)
    w = torch.randn(45, 96, generator=gen).bfloat16().requires_grad_(True)
    b = torch.randn(45, generator=gen).bfloat16()
    monkeypatch.setattr(reference, "cpu_has_native_bf16", lambda: False)
    ours = kernels.linear(x, w, b)
    g = torch.randn(ours.shape, generator=gen).bfloat16()
    ours_grads = torch.autograd.grad(ours, (x, w), g)
    theirs = F.linear(x, w, b)
    theirs_grads = torch.autograd.grad(theirs, (x, w), g)
    assert ours.dtype == torch.bfloat16 and ours_grads[0].dtype == torch.bfloat16
    # Same products, different summation order: at most a rounding step of bf16 apart.
    for a, e in zip((ours, *ours_grads), (theirs, *theirs_grads), strict=True):
        torch.testing.assert_close(a.float(), e.float(), atol=1e-2, rtol=8e-3)


def test_a_few_rows_keep_the_native_kernel(monkeypatch):
    # Decoding one token at a time: casting the weight to fp32 would cost more than the bf16 matmul.
    x, w = torch.randn(3, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    monkeypatch.setattr(reference, "cpu_has_native_bf16", lambda: False)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))


def qlora_step(path, batch, dtype):
    torch.manual_seed(0)
    model = nibble.load_model(path, task="classify", num_labels=3, quantize="nf4", dtype=dtype)
    apply_lora(model, "all-linear", rank=4)
    model.score.float().weight.requires_grad_(True)
    cache_dense_weights(model, 2**30, dtype)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    ids, mask = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype != torch.float32):
        logits = model(ids, mask)
    loss = F.cross_entropy(logits.float(), torch.tensor([0, 2, 1]))
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_qlora_step_on_fp32_units_is_bf16_as_native_bf16_is(shared_checkpoint, monkeypatch):
    """The same step in fp32, in bf16 on fp32 units, and in native bf16: the fp32-units run is as close to fp32
    as the native one (the same roundings), and not closer than bf16 can be (it did round to bf16)."""
    path, _ = shared_checkpoint("qwen3", num_labels=3)
    batch = right_padded_batch([9, 4, 6])
    exact_loss, exact = qlora_step(path, batch, torch.float32)
    monkeypatch.setattr(reference, "cpu_has_native_bf16", lambda: False)
    ours_loss, ours = qlora_step(path, batch, torch.bfloat16)
    monkeypatch.setattr(reference, "cpu_has_native_bf16", lambda: True)
    native_loss, native = qlora_step(path, batch, torch.bfloat16)
    assert ours.keys() == native.keys() == exact.keys() and len(ours) == 2 * 7 * 2 + 1
    assert abs(ours_loss - exact_loss) < 1e-2 and abs(native_loss - exact_loss) < 1e-2
    for name in ours:

        def off(grads, name=name):
            return ((grads[name] - exact[name]).norm() / exact[name].norm()).item()

        assert 1e-3 < off(ours) <= 1.5 * off(native) + 5e-3, name


def failing_onednn(monkeypatch, calls: list[torch.dtype]):
    """F.linear as on a native-bf16 CPU whose oneDNN cannot build a bf16 kernel (as under a memory limit)."""
    real = F.linear

    def linear(x, w, b=None):
        calls.append(x.dtype)
        if x.dtype == torch.bfloat16:
            raise RuntimeError("could not create a primitive")
        return real(x, w, b)

    monkeypatch.setattr(F, "linear", linear)
    monkeypatch.setattr(reference, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(reference, "_onednn_failed", False)


def test_a_bf16_matmul_oneDNN_cannot_build_runs_on_fp32_units_from_then_on(monkeypatch, capsys):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 96, generator=gen).bfloat16().requires_grad_(True)
    w = torch.randn(45, 96, generator=gen).bfloat16().requires_grad_(True)
    expected = reference._linear_on_fp32_units(x, w, None)
    calls: list[torch.dtype] = []
    failing_onednn(monkeypatch, calls)
    assert not kernels.on_fp32_units(torch.bfloat16, torch.device("cpu"))
    out = kernels.linear(x, w)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    assert calls == [torch.bfloat16, torch.float32]  # tried natively once, then on fp32 units
    note = capsys.readouterr().err
    assert note.count("\n") == 1 and "oneDNN failed (could not create a primitive)" in note and "fp32 units" in note
    # From then on low-precision matmuls go straight to fp32 units, forward and backward, without a second note.
    assert kernels.on_fp32_units(torch.bfloat16, torch.device("cpu"))
    calls.clear()
    out = kernels.linear(x, w)
    out.float().sum().backward()
    assert calls == [torch.float32] and x.grad.dtype == w.grad.dtype == torch.bfloat16
    assert capsys.readouterr().err == ""


def test_other_matmul_errors_are_not_taken_for_oneDNN_failures(monkeypatch):
    monkeypatch.setattr(reference, "_onednn_failed", False)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        kernels.linear(torch.randn(20, 8).bfloat16(), torch.randn(4, 9).bfloat16())
    assert not reference._onednn_failed
