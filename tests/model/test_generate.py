"""Generation with the KV cache: greedy tokens equal transformers' generate(do_sample=False)."""

from __future__ import annotations

import pytest
import torch

import nibble
from nibble.errors import NibbleError
from nibble.model.generate import generate, sample_next

PROMPT = [5, 17, 99, 3, 42]


@pytest.mark.parametrize(
    ("family", "kwargs"), [("qwen3", {}), ("qwen3_moe", {}), ("qwen2", {}), ("llama", {"tie_word_embeddings": True})]
)
def test_greedy_tokens_equal_transformers(shared_checkpoint, family, kwargs):
    path, hf = shared_checkpoint(family, **kwargs)
    model = nibble.load_model(path)
    streamed: list[int] = []
    ours = generate(model, PROMPT, max_new_tokens=24, on_token=streamed.append)
    theirs = hf.generate(torch.tensor([PROMPT]), do_sample=False, max_new_tokens=24, eos_token_id=[])
    assert ours == theirs[0, len(PROMPT) :].tolist()
    assert streamed == ours and len(ours) == 24


def test_generation_stops_at_eos_and_includes_it(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    model = nibble.load_model(path)
    free = generate(model, torch.tensor([PROMPT]), max_new_tokens=10, eos_token_id=[])
    stop_at = free[3]
    stopped = generate(model, PROMPT, max_new_tokens=10, eos_token_id=stop_at)
    assert stopped == free[: free.index(stop_at) + 1]


def test_sampling_is_reproducible_and_filters(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    model = nibble.load_model(path)
    runs = [
        generate(model, PROMPT, 12, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    greedy = generate(model, PROMPT, 12, eos_token_id=[])
    assert generate(model, PROMPT, 12, temperature=0.7, top_k=1, eos_token_id=[]) == greedy
    logits = torch.tensor([0.0, 5.0, 4.9, -3.0])
    picks = {sample_next(logits, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(s)) for s in range(50)}
    assert picks == {1}  # token 1 alone holds over half the probability mass
    picks = {sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(s)) for s in range(50)}
    assert picks == {1, 2}


def test_generate_rejects_classifiers_and_batches(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    with pytest.raises(NibbleError, match="causal_lm"):
        generate(nibble.load_model(path, task="classify", num_labels=2), PROMPT)
    with pytest.raises(NibbleError, match="one non-empty sequence"):
        generate(nibble.load_model(path), torch.zeros(2, 3, dtype=torch.long))
