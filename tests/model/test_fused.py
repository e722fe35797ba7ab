"""The hand-fused SwiGLU against the plain expression: same outputs and gradients (fp32, fp64 gradcheck), and bf16
gradients at least as close to the exact ones. The torch.compile'd norms, RoPE and SwiGLU (``--compile``) against
the eager ones on a whole model."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import nibble
from helpers import right_padded_batch
from nibble.model.model import EAGER, fused_elementwise, swiglu


def grads(fn, g, u, grad):
    g, u = g.detach().clone().requires_grad_(True), u.detach().clone().requires_grad_(True)
    y = fn(g, u)
    return (y, *torch.autograd.grad(y, (g, u), grad))


def plain(g, u):
    return F.silu(g) * u


def test_swiglu_equals_the_plain_expression_fp32():
    gen = torch.Generator().manual_seed(0)
    g, u = torch.randn(37, 123, generator=gen) * 3, torch.randn(37, 123, generator=gen)
    grad = torch.randn(37, 123, generator=gen)
    for ours, theirs in zip(grads(swiglu, g, u, grad), grads(plain, g, u, grad), strict=True):
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=1e-6)
    g64, u64 = (t.double().requires_grad_(True) for t in (g[:3, :7], u[:3, :7]))
    assert torch.autograd.gradcheck(swiglu, (g64, u64))


def test_swiglu_bf16_gradients_are_rounded_once():
    gen = torch.Generator().manual_seed(1)
    g, u = (torch.randn(64, 96, generator=gen) * 3).bfloat16(), torch.randn(64, 96, generator=gen).bfloat16()
    grad = torch.randn(64, 96, generator=gen).bfloat16()
    exact = grads(plain, g.double(), u.double(), grad.double())
    ours, theirs = grads(swiglu, g, u, grad), grads(plain, g, u, grad)
    for o, t, e in zip(ours, theirs, exact, strict=True):
        assert o.dtype == torch.bfloat16
        assert (o.double() - e).abs().max() <= (t.double() - e).abs().max()
        torch.testing.assert_close(o.double(), e, atol=0.02, rtol=0.01)  # within bf16 rounding of the exact value
    with torch.no_grad():
        torch.testing.assert_close(swiglu(g, u), plain(g, u), atol=0, rtol=0)


def test_compiled_elementwise_computes_what_the_eager_model_computes(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")  # QK-norm: the norm also runs per head
    model = nibble.load_model(path)
    for p in model.parameters():
        p.requires_grad_(True)
    ids, mask = right_padded_batch([9, 6, 2])
    results = []
    for ops in (EAGER, fused_elementwise()):
        model.use_elementwise(ops)
        model.zero_grad()
        logits = model(ids, mask)
        logits.logsumexp(-1).mul(mask).sum().backward()
        with torch.no_grad():
            evaluated = model(ids[:2, :5], mask[:2, :5])  # another shape, without autograd
        results.append((logits, evaluated, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (logits, evaluated, grads), (fused_logits, fused_evaluated, fused_grads) = results
    torch.testing.assert_close(fused_logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_evaluated, evaluated, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(fused_grads[name], grads[name], atol=1e-5, rtol=1e-5, msg=name)
