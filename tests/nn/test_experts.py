"""Grouped expert compute against a loop over tokens and their experts: outputs and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nibble.errors import NibbleError
from nibble.nn.experts import Experts
from nibble.quant import QuantSpec, quantize_rows


def _experts(num_experts: int, hidden: int, inter: int, spec: QuantSpec | None, lora: bool, seed: int = 0) -> Experts:
    gen = torch.Generator().manual_seed(seed)
    experts = Experts(num_experts, hidden, inter)
    for proj in (experts.gate_up_proj, experts.down_proj):
        dense = torch.randn(num_experts, proj.out_features, proj.in_features, generator=gen) * 0.2
        proj.set_weight(dense if spec is None else quantize_rows(dense.unbind(0), spec))
        if lora:
            proj.add_lora(rank=3, alpha=6.0)
            with torch.no_grad():
                proj.lora_B.normal_(0, 0.3, generator=gen)
    return experts


def _loop(experts: Experts, x, index, weight):
    """The definition, one token and one of its experts at a time."""
    gate_up, down = experts.gate_up_proj, experts.down_proj
    w1, w2 = gate_up.dequantize(), down.dequantize()
    out = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1])
        for j in range(index.shape[1]):
            e = int(index[t, j])
            h = x[t] @ w1[e].T
            if gate_up.lora_A is not None:
                h = h + (x[t] @ gate_up.lora_A[e].T) @ gate_up.lora_B[e].T * gate_up.scaling
            g, u = h.chunk(2)
            a = F.silu(g) * u
            y = a @ w2[e].T
            if down.lora_A is not None:
                y = y + (a @ down.lora_A[e].T) @ down.lora_B[e].T * down.scaling
            acc = acc + weight[t, j] * y
        out.append(acc)
    return torch.stack(out)


def _swiglu(g, u):
    return F.silu(g) * u


@pytest.mark.parametrize("spec", [None, QuantSpec("nf4"), QuantSpec("int4", group_size=64)], ids=str)
@pytest.mark.parametrize("lora", [False, True])
def test_grouped_equals_loop_with_gradients(spec, lora):
    num_experts, hidden, inter, tokens, k = 5, 64, 64, 23, 2
    experts = _experts(num_experts, hidden, inter, spec, lora)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=gen, requires_grad=True)
    index = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens)])
    index[:, 0] = torch.where(index[:, 0] == 4, 3, index[:, 0])  # some experts get no token in one slot
    weight = torch.rand(tokens, k, generator=gen, requires_grad=True)
    params = [x, weight] + [p for p in experts.parameters() if p.requires_grad]
    grouped = experts(x, index, weight, _swiglu)
    ref = _loop(experts, x, index, weight)
    torch.testing.assert_close(grouped, ref, atol=1e-5, rtol=1e-5)
    probe = torch.randn(grouped.shape, generator=gen)
    grads = torch.autograd.grad((grouped * probe).sum(), params)
    ref_grads = torch.autograd.grad((ref * probe).sum(), params)
    for ours, theirs in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)  # sums over 46 assignments in fp32


def test_unused_expert_gets_zero_lora_gradient():
    experts = _experts(4, 64, 64, None, lora=True)
    x = torch.randn(6, 64)
    index = torch.tensor([[0, 1]] * 6)
    experts(x, index, torch.full((6, 2), 0.5), _swiglu).sum().backward()
    assert experts.gate_up_proj.lora_B.grad[2:].abs().max() == 0
    assert experts.gate_up_proj.lora_B.grad[:2].abs().max() > 0


def test_shapes_are_checked():
    experts = Experts(3, 64, 64)
    with pytest.raises(NibbleError, match=r"experts need shape \[3, 128, 64\]"):
        experts.gate_up_proj.set_weight(torch.zeros(3, 64, 64))
    with pytest.raises(NibbleError, match="lora_rank 65"):
        experts.down_proj.add_lora(rank=65, alpha=1.0)


def test_dense_copy_of_4bit_experts_computes_the_same():
    experts = _experts(4, 64, 64, QuantSpec("nf4"), lora=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 64, generator=gen)
    index = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(9)])
    weight = torch.rand(9, 2, generator=gen)
    outs = []
    for cached in (False, True):
        for proj in (experts.gate_up_proj, experts.down_proj):
            proj.cache_dequantized = cached
        xi = x.clone().requires_grad_(True)
        y = experts(xi, index, weight, _swiglu)
        y.sum().backward()
        outs.append((y.detach(), xi.grad, experts.down_proj.lora_A.grad.clone()))
        experts.zero_grad()
    assert experts.gate_up_proj._cache and experts.gate_up_proj.frozen_weight().pieces == 4
    for plain, copied in zip(*outs, strict=True):
        torch.testing.assert_close(plain, copied, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("spec", [QuantSpec("nf4"), QuantSpec("int4", group_size=64)], ids=str)
def test_4bit_experts_held_as_parameters_compute_the_same(spec):
    """--shard-base holds 4-bit experts as uint8 parameters, a row per expert row (what FSDP2 shards); outputs and
    gradients are unchanged, and a dense layer's experts are left as they are."""
    experts = _experts(4, 64, 64, spec, lora=True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(9, 64, generator=gen, requires_grad=True)
    index = torch.stack([torch.randperm(4, generator=gen)[:2] for _ in range(9)])
    weight = torch.rand(9, 2, generator=gen)
    before = experts(x, index, weight, _swiglu)
    (grad,) = torch.autograd.grad(before.sum(), [x])
    for proj in (experts.gate_up_proj, experts.down_proj):
        proj.hold_as_parameters()
        held = {name: p for name, p in proj.named_parameters() if name.startswith("held_")}
        assert held and all(p.dtype == torch.uint8 and not p.requires_grad for p in held.values())
        assert held["held_packed"].shape[0] == proj.num_experts * proj.out_features
    after = experts(x, index, weight, _swiglu)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(after.sum(), [x])[0], grad, rtol=0, atol=0)
    dense = _experts(4, 64, 64, None, lora=False)
    dense.gate_up_proj.hold_as_parameters()
    assert not [name for name, _ in dense.named_parameters() if "held_" in name]
