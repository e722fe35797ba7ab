from __future__ import annotations

import torch
import torch.nn.functional as F

import nibble
from helpers import right_padded_batch
from nibble.model import model as model_module
from nibble.nn import attention
from nibble.nn.attention import blocked_causal_attention


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def output_and_grads(fn, q, k, v, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in leaves]


def test_gradients_match_finite_differences_across_blocks(monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_ROWS", 6)  # 3 tokens x 2 grouped heads a block: 7 tokens in 3 blocks
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 4, dtype=torch.float64, generator=gen, requires_grad=True) for h in (4, 2, 2))
    assert torch.autograd.gradcheck(blocked_causal_attention, (q, k, v))


def test_equals_sdpa_with_grouped_heads_fp32():
    gen = torch.Generator().manual_seed(1)
    # 300 tokens x 3 grouped heads: blocks of 42 tokens, the last one partial.
    q, k, v = (torch.randn(2, h, 300, 16, generator=gen) for h in (9, 3, 3))
    grad_out = torch.randn(2, 9, 300, 16, generator=gen)
    out, grads = output_and_grads(blocked_causal_attention, q, k, v, grad_out)
    ref_out, ref_grads = output_and_grads(sdpa, q, k, v, grad_out)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for name, g, ref in zip("qkv", grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5, msg=name)


def test_only_the_needed_gradients_are_computed():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, h, 20, 8, generator=gen) for h in (4, 2, 2))
    q.requires_grad_(True)  # keys and values frozen, as in a first layer with LoRA on q only
    blocked_causal_attention(q, k, v).sum().backward()
    ref_q = q.detach().clone().requires_grad_(True)
    sdpa(ref_q, k, v).sum().backward()
    torch.testing.assert_close(q.grad, ref_q.grad, atol=1e-5, rtol=1e-5)
    assert k.grad is None and v.grad is None


def test_model_trains_through_blocked_attention_as_transformers_computes(shared_checkpoint, monkeypatch):
    path, hf = shared_checkpoint("qwen3", max_position_embeddings=512)  # 4 query heads over 2 key/value heads
    model = nibble.load_model(path)
    for p in model.parameters():
        p.requires_grad_(True)
    ids, mask = right_padded_batch([300, 264])
    calls = []
    monkeypatch.setattr(
        model_module, "blocked_causal_attention", lambda *a: calls.append(1) or blocked_causal_attention(*a)
    )

    def run():
        model.zero_grad()
        logits = model(ids, mask)
        logits.logsumexp(-1).mul(mask).sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    logits, grads = run()
    assert len(calls) == model.config.num_hidden_layers
    with torch.no_grad():
        model(ids, mask)  # evaluation keeps SDPA's kernel
    assert len(calls) == model.config.num_hidden_layers
    monkeypatch.setattr(model_module, "BLOCKED_TOKENS", range(0))
    sdpa_logits, sdpa_grads = run()
    assert len(calls) == model.config.num_hidden_layers
    torch.testing.assert_close(logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], sdpa_grads[name], atol=1e-5, rtol=1e-5, msg=name)
    with torch.no_grad():
        hf_logits = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], hf_logits[real], atol=1e-5, rtol=1e-5)
