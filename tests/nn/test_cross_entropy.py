"""linear_cross_entropy against the plain path (full logits, F.cross_entropy): loss and every gradient, in chunks
that do and do not divide the rows, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nibble.nn.cross_entropy import linear_cross_entropy, linear_log_probs


def full_path(hidden, weight, targets, reduction):
    return F.cross_entropy((hidden @ weight.to(hidden.dtype).T).float(), targets, reduction=reduction)


@pytest.mark.parametrize("rows,chunk", [(37, 5), (37, 37), (37, None), (1, 4), (64, 16)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("train_weight", [False, True])
def test_chunked_equals_full_cross_entropy_fp32(rows, chunk, reduction, train_weight):
    gen = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 24, generator=gen)
    weight = torch.randn(123, 24, generator=gen) * 0.5
    targets = torch.randint(0, 123, (rows,), generator=gen)
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    w1, w2 = weight.clone().requires_grad_(train_weight), weight.clone().requires_grad_(train_weight)
    ours = linear_cross_entropy(h1, w1, targets, reduction, chunk_rows=chunk)
    theirs = full_path(h2, w2, targets, reduction)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-6)
    (ours * 1.7).backward()
    (theirs * 1.7).backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-6, rtol=1e-5)
    if train_weight:
        torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)
    else:
        assert w1.grad is None


def test_chunked_equals_full_cross_entropy_bf16():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(50, 32, generator=gen).bfloat16()
    weight = torch.randn(200, 32, generator=gen)
    targets = torch.randint(0, 200, (50,), generator=gen)
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    ours = linear_cross_entropy(h1, weight, targets, chunk_rows=7)
    theirs = full_path(h2, weight, targets, "mean")
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # same bf16 logits, fp32 softmax
    ours.backward(), theirs.backward()
    assert h1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), atol=1e-4, rtol=1e-2)


def test_no_rows_gives_a_zero_loss_that_backpropagates():
    hidden = torch.zeros(0, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(10, 8), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.shape == (0, 8)


def test_without_grad_only_the_loss_is_computed():
    hidden, weight = torch.randn(9, 8), torch.randn(10, 8)
    targets = torch.randint(0, 10, (9,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, targets, "sum", chunk_rows=4)
    torch.testing.assert_close(loss, full_path(hidden, weight, targets, "sum"))


@pytest.mark.parametrize("rows,chunk", [(37, 5), (37, None), (1, 4)])
@pytest.mark.parametrize("train_weight", [False, True])
def test_chunked_log_probs_equal_the_full_log_softmax(rows, chunk, train_weight):
    gen = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, 24, generator=gen)
    weight = torch.randn(123, 24, generator=gen) * 0.5
    targets = torch.randint(0, 123, (rows,), generator=gen)
    upstream = torch.randn(rows, generator=gen)  # a different gradient per row, as per-sequence sums give
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    w1, w2 = weight.clone().requires_grad_(train_weight), weight.clone().requires_grad_(train_weight)
    ours = linear_log_probs(h1, w1, targets, chunk_rows=chunk)
    theirs = F.log_softmax((h2 @ w2.T).float(), -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-6)
    (ours * upstream).sum().backward()
    (theirs * upstream).sum().backward()
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-6, rtol=1e-5)
    if train_weight:
        torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)
    else:
        assert w1.grad is None


def test_chunked_log_probs_bf16():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(30, 32, generator=gen).bfloat16()
    weight = torch.randn(200, 32, generator=gen)
    targets = torch.randint(0, 200, (30,), generator=gen)
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    ours = linear_log_probs(h1, weight, targets, chunk_rows=7)
    theirs = F.log_softmax((h2 @ weight.bfloat16().T).float(), -1).gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)  # same bf16 logits, fp32 softmax
    ours.sum().backward(), theirs.sum().backward()
    assert h1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(h1.grad.float(), h2.grad.float(), atol=1e-2, rtol=1e-2)
