"""The padding-free path: a right-padded batch computes on its real tokens only, and gives each row exactly
what that row gives alone (no padding at all), logits and gradients; the pooled-only final block equals
the full one; gradients equal transformers' on the padded batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import nibble
from helpers import right_padded_batch
from nibble.nn import apply_lora

LENGTHS = [9, 3, 6, 1, 7]
ATOL = 1e-5
FAMILIES = {"qwen3": {}, "qwen2": {}, "llama": {"tie_word_embeddings": True}, "mistral": {"sliding_window": 4}}


def trainable(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(ours, theirs):
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=ATOL, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_lm_rows_equal_each_row_alone_logits_and_gradients(shared_checkpoint, family):
    path, _ = shared_checkpoint(family, **FAMILIES[family])
    model = trainable(nibble.load_model(path))
    ids, mask = right_padded_batch(LENGTHS)
    targets = torch.randint(0, 256, ids.shape, generator=torch.Generator().manual_seed(5))

    logits = model(ids, mask)  # [B, T, V]
    F.cross_entropy(logits[mask.bool()], targets[mask.bool()], reduction="sum").backward()
    batched = grads(model)
    for row, n in enumerate(LENGTHS):
        alone = model(ids[row : row + 1, :n])  # no mask, no padding: the plain path
        torch.testing.assert_close(logits[row, :n], alone[0], atol=ATOL, rtol=0)
        F.cross_entropy(alone[0], targets[row, :n], reduction="sum").backward()
    assert_grads_close(batched, grads(model))
    assert (logits[~mask.bool()] == 0).all()  # pad positions are never computed


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_batched_classifier_rows_equal_each_row_alone(shared_checkpoint, pooling):
    path, _ = shared_checkpoint("qwen3", num_labels=3)
    model = trainable(nibble.load_model(path, task="classify", pooling=pooling))
    ids, mask = right_padded_batch(LENGTHS)
    labels = torch.tensor([0, 2, 1, 1, 0])
    logits = model(ids, mask)
    F.cross_entropy(logits, labels, reduction="sum").backward()
    batched = grads(model)
    for row, n in enumerate(LENGTHS):
        alone = model(ids[row : row + 1, :n])
        torch.testing.assert_close(logits[row], alone[0], atol=ATOL, rtol=0)
        F.cross_entropy(alone, labels[row : row + 1], reduction="sum").backward()
    assert_grads_close(batched, grads(model))


def test_pooled_only_final_block_equals_the_full_block(shared_checkpoint):
    """Last-token pooling runs the final block's queries, o_proj, MLP and norm at the last tokens only; the
    same logits and gradients come from pooling the full final hidden states."""
    path, _ = shared_checkpoint("qwen3", num_labels=3)
    model = trainable(nibble.load_model(path, task="classify"))
    apply_lora(model, "all-linear", rank=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    ids, mask = right_padded_batch(LENGTHS)
    labels = torch.tensor([0, 2, 1, 1, 0])
    model.train()  # the default LoRA dropout is 0: both paths are deterministic

    fast = model(ids, mask)
    F.cross_entropy(fast, labels).backward()
    fast_grads = grads(model)
    hidden = model.hidden_states(ids, mask)  # [B, T, H], every position through the final block
    full = model.score(hidden[torch.arange(len(LENGTHS)), torch.tensor(LENGTHS) - 1])
    F.cross_entropy(full, labels).backward()
    torch.testing.assert_close(fast, full, atol=ATOL, rtol=0)
    assert_grads_close(fast_grads, grads(model))


def test_padded_batch_gradients_equal_transformers(shared_checkpoint):
    path, hf = shared_checkpoint("qwen2")
    model = trainable(nibble.load_model(path))
    ids, mask = right_padded_batch(LENGTHS)
    weights = torch.randn(*ids.shape, 320, generator=torch.Generator().manual_seed(7))
    real = mask.bool()[..., None]
    (model(ids, mask) * weights * real).sum().backward()
    ours = grads(model)
    theirs_model = trainable(type(hf)(hf.config))
    theirs_model.load_state_dict(hf.state_dict())
    (theirs_model(input_ids=ids, attention_mask=mask).logits * weights * real).sum().backward()
    theirs = {n: p.grad for n, p in theirs_model.named_parameters() if p.grad is not None}
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-4, rtol=1e-4, msg=name)


def dropout_model(path, task: str, pooling: str = "last"):
    """A model with LoRA (dropout 0.3) on every linear layer, B non-zero so the masks reach the output."""
    model = nibble.load_model(path, task=task, pooling=pooling)
    apply_lora(model, "all-linear", rank=4, dropout=0.3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    return model.train()


def same_gradients(ours, theirs):
    """Equal up to fp32 summation order (relative to each gradient's largest element)."""
    assert ours.keys() == theirs.keys()
    for name in ours:
        scale = theirs[name].abs().max().item()
        assert (ours[name] - theirs[name]).abs().max().item() <= 1e-4 * scale, name


@pytest.mark.parametrize("task", ["causal_lm", "classify"])
def test_lora_dropout_masks_follow_the_sequence_not_the_batch_layout(shared_checkpoint, task):
    """The same sequences in another order, with other padding, split over two micro-batches (as ranks or
    --grad-accum split a step), get the very masks they get in one batch: equal outputs and gradients with
    dropout on; another step draws other masks, and eval mode none."""
    from nibble.data.batching import pad_batch
    from nibble.nn.lora import set_dropout_step

    path, _ = shared_checkpoint("qwen3", num_labels=3) if task == "classify" else shared_checkpoint("qwen3")
    model = dropout_model(path, task)
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in LENGTHS]
    weights = [torch.randn(n if task == "causal_lm" else 1, generator=gen) for n in LENGTHS]

    def run(groups: list[list[int]], step: int = 3):
        """Each example's output, and the summed gradients, over micro-batches of the examples in ``groups``."""
        set_dropout_step(model, 42, step)
        outputs = {}
        for group in groups:
            batch = pad_batch([seqs[i] for i in group], 0)
            out = model(batch["input_ids"], batch["attention_mask"], token_index=batch["token_index"])
            loss = 0
            for row, i in enumerate(group):
                outputs[i] = out[row, : LENGTHS[i]] if task == "causal_lm" else out[row]
                loss = loss + (outputs[i].sum(-1) * weights[i]).sum()
            loss.backward()
        return [outputs[i].detach() for i in range(len(seqs))], grads(model)

    whole, whole_grads = run([list(range(len(seqs)))])
    split, split_grads = run([[4, 1], [3, 0, 2]])  # another order and padding width, two micro-batches
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    same_gradients(whole_grads, split_grads)
    model.gradient_checkpointing = True  # recomputed blocks draw the same masks again
    same_gradients(whole_grads, run([list(range(len(seqs)))])[1])
    model.gradient_checkpointing = False

    other, _ = run([list(range(len(seqs)))], step=4)
    model.eval()
    plain, _ = run([list(range(len(seqs)))])
    for a, b, c in zip(whole, other, plain, strict=True):
        assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3
