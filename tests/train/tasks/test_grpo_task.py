"""The GRPO task's training pass scores exactly what the sampler drew: the completion log-probs through the chunked
head over the padded prompt + completion batch equal the sampler's recorded ones (ragged prompts and completions,
a temperature), so the loss's ratios start at 1 and its gradients reach the right tokens."""

from __future__ import annotations

import torch

from helpers import adapted
from nibble.model.sampler import SamplingConfig, sample
from nibble.nn.lora import lora_layers
from nibble.train.tasks.grpo import PromptData, completion_batch, completion_logps


def test_training_logps_equal_the_sampled_ones(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    model = adapted(path)
    prompts = [[5, 17, 99, 3, 42], [11, 12, 13], [7, 8, 9, 10]]
    data = PromptData("p.jsonl", prompts, ["a", "b", "c"], {}, [1, 2, 3])
    rows = [2, 0, 1]  # a micro-batch's prompts in stream order
    stops = tuple(range(0, model.config.vocab_size, 5))
    config = SamplingConfig(max_new_tokens=8, temperature=0.7, stop_token_ids=stops)
    completions = sample(model, [prompts[r] for r in rows], 3, config, generator=torch.Generator().manual_seed(1))
    assert len({len(c.tokens) for c in completions}) > 1
    batch = completion_batch(data, rows, completions, pad_id=0)
    logps = completion_logps(model, batch, 0.7, torch.device("cpu"))  # [B, C]
    for b, completion in enumerate(completions):
        n = len(completion.tokens)
        torch.testing.assert_close(logps[b, :n].detach(), torch.tensor(completion.logps), rtol=0, atol=1e-5)
        assert torch.all(logps[b, n:] == 0)
    logps.sum().backward()
    assert all(layer.lora_A.weight.grad is not None for layer in lora_layers(model).values())
