"""The gated delta rule's forms against each other and against transformers: the chunked form (hand-written
backward) against the plain recurrence in fp64 (finite differences too) and against transformers'
``torch_chunk_gated_delta_rule`` in fp32, at lengths around the chunk size and with key heads shared by groups
of value heads; packed sequences against each alone; the step form against the recurrence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nibble.nn.delta_rule import chunk_gated_delta_rule, gated_delta_step, naive_gated_delta_rule

LENGTHS = [1, 63, 65, 200]


def make_inputs(t, *, b=2, hk=2, hv=4, dk=8, dv=6, dtype=torch.float64, seed=0):
    """q, k (L2-normalized, as the model feeds them), v, g (<= 0), beta in (0, 1), all requiring grad."""
    gen = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, t, hk, dk, generator=gen, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(b, t, hk, dk, generator=gen, dtype=dtype), dim=-1)
    v = torch.randn(b, t, hv, dv, generator=gen, dtype=dtype)
    g = -torch.rand(b, t, hv, generator=gen, dtype=dtype) * 0.7
    beta = torch.rand(b, t, hv, generator=gen, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, g, beta)]


def outputs_and_grads(fn, xs, seed=1):
    """``fn(*xs)``'s (output, final state) and the gradients of a random projection of both wrt every input."""
    out, final = fn(*xs)
    gen = torch.Generator().manual_seed(seed)
    loss = (out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum()
    loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=final.dtype)).sum()
    return out, final, torch.autograd.grad(loss, [x for x in xs if x.requires_grad])


def assert_all_close(ours, theirs, atol, rtol=0.0):
    for name, a, b in zip(("output", "state", "grads"), ours, theirs, strict=True):
        if name == "grads":
            for arg, ga, gb in zip("q k v g beta init".split(), a, b, strict=False):
                torch.testing.assert_close(ga, gb, atol=atol, rtol=rtol, msg=f"d{arg}")
        else:
            torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("t", LENGTHS)
def test_chunked_equals_the_recurrence_in_fp64_outputs_and_gradients(t):
    xs = make_inputs(t)
    assert_all_close(
        outputs_and_grads(chunk_gated_delta_rule, xs), outputs_and_grads(naive_gated_delta_rule, xs), atol=1e-12
    )


def test_chunked_gradcheck_across_a_chunk_boundary_with_initial_state():
    xs = make_inputs(67, b=1, hk=1, hv=2, dk=3, dv=2)
    init = torch.randn(1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: chunk_gated_delta_rule(*a[:5], initial_state=a[5]), (*xs, init))


@pytest.mark.parametrize("t", LENGTHS)
def test_chunked_equals_transformers_torch_chunk_in_fp32(t):
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule

    xs = make_inputs(t, dtype=torch.float32, seed=t)
    init = torch.randn(2, 4, 8, 6, generator=torch.Generator().manual_seed(t), requires_grad=True)

    def theirs(q, k, v, g, beta, state):
        return torch_chunk_gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True)

    ours = outputs_and_grads(lambda *a: chunk_gated_delta_rule(*a[:5], initial_state=a[5]), [*xs, init])
    assert_all_close(ours, outputs_and_grads(theirs, [*xs, init]), atol=2e-5, rtol=1e-5)


def test_packed_sequences_equal_each_alone():
    lengths = [5, 70, 1, 64]
    xs = make_inputs(sum(lengths), b=1, seed=3)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    packed = outputs_and_grads(lambda *a: chunk_gated_delta_rule(*a, cu_seqlens=cu), xs)
    oracle = outputs_and_grads(lambda *a: naive_gated_delta_rule(*a, cu_seqlens=cu), xs)
    assert_all_close(packed, oracle, atol=1e-12)
    for s, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        alone, final = chunk_gated_delta_rule(*(x[:, start:end] for x in xs))
        torch.testing.assert_close(packed[0][:, start:end], alone, atol=1e-12, rtol=0)
        torch.testing.assert_close(packed[1][s], final[0], atol=1e-12, rtol=0)


def test_steps_continue_a_chunked_prefix():
    xs = [x.detach() for x in make_inputs(9, dtype=torch.float32, seed=4)]
    whole, final = naive_gated_delta_rule(*xs)
    _, state = chunk_gated_delta_rule(*(x[:, :6] for x in xs))
    for i in range(6, 9):
        out, state = gated_delta_step(*(x[:, i] for x in xs), state, 8**-0.5)
        torch.testing.assert_close(out, whole[:, i], atol=1e-6, rtol=0)
    torch.testing.assert_close(state, final, atol=1e-6, rtol=0)
    assert state.dtype == torch.float32
