"""The batched sampler: greedy rows equal ``generate`` and transformers' generate, recorded log-probs equal a
separate forward's, rows that stop leave the batch without changing the others, and a seed fixes the samples."""

from __future__ import annotations

import pytest
import torch

import nibble
from helpers import adapted
from nibble.errors import NibbleError
from nibble.model.generate import generate
from nibble.model.sampler import SamplingConfig, filter_logits, sample

# Two prompts of one length and one of another: Qwen3 left-pads them into one batch, Qwen3.5 (recurrent layers)
# decodes each length as its own batch.
PROMPTS = [[5, 17, 99, 3, 42], [7, 7, 1, 200, 9], [11, 12, 13]]


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5_text"])
def test_greedy_rows_equal_generate_and_transformers(shared_checkpoint, family):
    path, hf = shared_checkpoint(family)
    model = nibble.load_model(path)
    out = sample(model, PROMPTS, 2, SamplingConfig(max_new_tokens=12, temperature=0.0))
    assert [c.prompt_index for c in out] == [0, 0, 1, 1, 2, 2]
    for completion in out:
        prompt = PROMPTS[completion.prompt_index]
        theirs = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12, eos_token_id=[])
        assert completion.tokens == theirs[0, len(prompt) :].tolist()
        assert completion.truncated
    lora = adapted(path)
    for completion in sample(lora, PROMPTS, 1, SamplingConfig(max_new_tokens=12, temperature=0.0)):
        assert completion.tokens == generate(lora, PROMPTS[completion.prompt_index], 12, eos_token_id=[])


def forward_logps(model, prompt, tokens, temperature):
    """The completion's per-token log-probs from one forward over prompt + completion."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]  # [L, V]
    return (logits / temperature).log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("family", ["qwen3", "qwen3_5_text"])
def test_recorded_logps_equal_a_separate_forward(shared_checkpoint, family):
    """Sampled rows diverge and some stop early (the stop token leaves the batch); every row's recorded log-probs
    still equal a forward over its own tokens, so the cache rows stayed with their sequences."""
    path, _ = shared_checkpoint(family)
    model = adapted(path)
    # Qwen3.5 decodes with the recurrent step and scores with the chunked delta rule: fp32 forms of one sum whose
    # rounding differs by up to ~4e-6 of the log-prob (1.3e-5 at -3 seen), so it gets a relative term as well.
    rtol = 1e-5 if family == "qwen3_5_text" else 0.0
    config = SamplingConfig(
        max_new_tokens=10, temperature=0.8, stop_token_ids=tuple(range(0, model.config.vocab_size, 11))
    )
    out = sample(model, PROMPTS, 4, config, generator=torch.Generator().manual_seed(3))
    lengths = {len(c.tokens) for c in out}
    assert len(lengths) > 1 and any(c.truncated for c in out) and not all(c.truncated for c in out)
    for completion in out:
        assert completion.truncated == (completion.tokens[-1] % 11 != 0)
        assert all(t % 11 for t in completion.tokens[:-1])
        expected = forward_logps(model, PROMPTS[completion.prompt_index], completion.tokens, 0.8)
        torch.testing.assert_close(torch.tensor(completion.logps), expected, rtol=rtol, atol=1e-5)


def test_a_seed_fixes_the_samples(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    model = nibble.load_model(path)
    config = SamplingConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, top_k=50, min_p=0.01)
    runs = [sample(model, PROMPTS, 3, config, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert [c.tokens for c in runs[0]] == [c.tokens for c in runs[1]]
    assert len({tuple(c.tokens) for c in runs[0]}) > 3  # sampling, not greedy


def test_stop_strings_end_a_completion(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    model = nibble.load_model(path)
    free = sample(model, PROMPTS[:1], 1, SamplingConfig(max_new_tokens=8, temperature=0.0))[0].tokens

    def decode(ids):
        return " ".join(map(str, ids))

    stop = decode(free[2:4])
    out = sample(
        model, PROMPTS[:1], 1, SamplingConfig(max_new_tokens=8, temperature=0.0, stop_strings=(stop,)), decode=decode
    )[0]
    assert out.tokens == free[:4] and not out.truncated


def test_filters_match_their_definitions():
    logits = torch.tensor([[0.0, 5.0, 4.9, -3.0, 2.0]])
    kept = lambda **kw: torch.isfinite(filter_logits(logits, SamplingConfig(**kw)))[0].nonzero()[:, 0].tolist()  # noqa: E731
    assert kept(top_k=2) == [1, 2]
    assert kept(top_p=0.5) == [1]  # token 1 alone holds 51% of the mass
    probs = logits.softmax(-1)[0]
    assert kept(min_p=0.1) == (probs >= 0.1 * probs.max()).nonzero()[:, 0].tolist()
    assert kept(temperature=0.5, top_p=0.99) == [1, 2]


def test_bad_settings_are_one_line(shared_checkpoint):
    with pytest.raises(NibbleError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(NibbleError, match="min_p"):
        SamplingConfig(min_p=2.0)
    path, _ = shared_checkpoint("qwen3")
    with pytest.raises(NibbleError, match="stop strings need"):
        sample(nibble.load_model(path), PROMPTS, 1, SamplingConfig(stop_strings=("x",)))
