"""Launch overhead: what does not change between calls over one weight is built once per weight, not per call."""

from __future__ import annotations

import gc

import torch

from nibble.kernels import reference, triton_common, triton_gemm, triton_grad_input, triton_ops
from nibble.quant import nf4


class _Recording:
    """Stands in for an autotuner: records the keyword arguments of each launch and runs the real one."""

    def __init__(self, autotuner):
        self.autotuner, self.calls = autotuner, []
        self.cache = autotuner.cache

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.calls.append(kwargs)
            return self.autotuner[grid](**kwargs)

        return launch


def test_repeated_calls_reuse_the_operands_and_the_codebook(monkeypatch, device):
    built = []
    monkeypatch.setattr(triton_common, "nf4_code", lambda d: built.append(d) or nf4.nf4_code(d))
    triton_common._nf4_code.cache_clear()
    recorders = {}
    for module in (triton_gemm, triton_grad_input):
        for name in ("_small_m", "_large_m"):
            recorders[module, name] = _Recording(getattr(module, name))
            monkeypatch.setattr(module, name, recorders[module, name])
    generator = torch.Generator().manual_seed(0)
    qweight = nf4.quantize(torch.randn(45, 128, generator=generator) * 0.05, double_quant=True).to(device)
    for m in (3, 3, 17, 17):  # both families, twice each
        x = torch.randn(m, 128, generator=generator).to(device)
        grad_y = torch.randn(m, 45, generator=generator).to(device)
        first = triton_gemm.matmul(x, qweight)
        assert torch.equal(triton_gemm.matmul(x, qweight), first)  # the cached arguments give the same result
        torch.testing.assert_close(first, reference.matmul(x, qweight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            triton_grad_input.matmul_grad_input(grad_y, qweight),
            reference.matmul_grad_input(grad_y, qweight),
            rtol=1e-5,
            atol=1e-5,
        )
    triton_ops.dequantize(qweight, torch.float32)
    assert built == [qweight.device]  # one codebook for the device, not one per call
    launches = [kw for r in recorders.values() for kw in r.calls]
    assert len(launches) == 12
    for name in ("code_ptr", "nested_code_ptr", "nested_absmax_ptr", "scale_ptr", "packed_ptr"):
        assert len({id(kw[name]) for kw in launches}) == 1, name  # the very same tensors at every launch
    assert triton_common.gemm_constants(qweight, torch.float32) is triton_common.gemm_constants(qweight, torch.float32)


def test_cached_arguments_follow_the_weight_object(device):
    qweight = nf4.quantize(torch.randn(8, 64, generator=torch.Generator().manual_seed(1))).to(device)
    args = triton_common.weight_operands(qweight)
    moved = qweight.to(device)  # a new weight (as moving or cutting one makes): its own arguments
    assert triton_common.weight_operands(moved) is not args
    assert triton_common.weight_operands(moved)["packed_ptr"] is moved.packed
    entries = len(triton_common._operands)
    del qweight, moved, args
    gc.collect()
    assert len(triton_common._operands) == entries - 2  # dropped with their weights
