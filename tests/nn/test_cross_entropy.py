"""linear_cross_entropy against the plain path (full logits, F.cross_entropy): loss and every gradient, in chunks
that do and do not divide the rows, fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nibble.nn.cross_entropy import (
    add_head_grad,
    chunk_elements,
    default_chunk_rows,
    linear_cross_entropy,
    linear_log_probs,
)


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


def test_chunk_size_does_not_change_the_loss_or_its_gradients():
    """27 rows a chunk (the CPU size at Qwen3's vocab) and 4096 (about the accelerator size) agree within fp32
    rounding, in the loss and both gradients."""
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(4200, 32, generator=generator)
    weight = torch.randn(300, 32, generator=generator) * 0.2
    targets = torch.randint(0, 300, (4200,), generator=generator)
    results = []
    for chunk in (27, 4096):
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = linear_cross_entropy(h, w, targets, chunk_rows=chunk)
        loss.backward()
        results.append((loss.detach(), h.grad, w.grad))
    for small, large in zip(*results, strict=True):
        torch.testing.assert_close(small, large, rtol=1e-5, atol=1e-6)


def test_chunks_are_sized_per_device():
    qwen3_vocab = 151936
    assert chunk_elements("cpu") // qwen3_vocab == 27
    assert chunk_elements("cuda") // qwen3_vocab >= 1024 and chunk_elements("cuda") * 4 <= 2**30  # 1 GiB of fp32
    assert default_chunk_rows(torch.empty(1, 8), qwen3_vocab) == 27
    assert default_chunk_rows(torch.empty(1, 8, device="meta"), qwen3_vocab) == chunk_elements("cuda") // qwen3_vocab


def test_head_gradient_widens_to_fp32_on_cpu_and_keeps_bf16_operands_on_cuda():
    generator = torch.Generator().manual_seed(6)
    g = torch.randn(9, 20, generator=generator).bfloat16()
    h = torch.randn(9, 8, generator=generator).bfloat16()
    grad_w = torch.ones(20, 8)
    add_head_grad(grad_w, g, h)
    assert torch.equal(grad_w, torch.ones(20, 8).addmm_(g.T.float(), h.float()))  # true fp32 on the CPU
    on_meta = torch.zeros(20, 8, device="meta")  # CUDA's path (fp32 accumulation of bf16 products), shapes only
    add_head_grad(on_meta, g.to("meta"), h.to("meta"))
    assert on_meta.dtype == torch.float32 and on_meta.shape == (20, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the bf16-operand head gradient runs on CUDA")
def test_head_gradient_on_cuda_is_the_fp32_gradient_within_bf16_product_rounding():
    generator = torch.Generator().manual_seed(7)
    g = torch.randn(512, 1000, generator=generator).bfloat16().cuda()
    h = torch.randn(512, 64, generator=generator).bfloat16().cuda()
    grad_w = torch.zeros(1000, 64, device="cuda")
    add_head_grad(grad_w, g, h)
    torch.testing.assert_close(grad_w, g.T.float() @ h.float(), rtol=1e-4, atol=1e-4)
