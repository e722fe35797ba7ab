"""``--num-iterations`` 2 on a real rollout: the first pass keeps its own log-probs as the sampling policy's, and
after an optimizer step the second pass's loss and gradients (with respect to its log-probs) equal TRL's
``GRPOTrainer._compute_loss`` given those log-probs as ``old_per_token_logps``: the clipped ratio against the
sampler, no longer 1."""

from __future__ import annotations

import pytest
import torch

import nibble
from nibble.io.tokenizer import load_tokenizer
from nibble.nn import apply_lora
from nibble.nn.lora import lora_layers
from nibble.train.config import TrainConfig
from nibble.train.tasks.grpo import PromptData, Rollout
from nibble.train.tasks.grpo_rewards import build_rewards

pytest.importorskip("trl.trainer.grpo_trainer")
from grpo_oracle import trl_loss  # noqa: E402

PROMPTS = [[5, 17, 99, 3, 42], [11, 12, 13]]


@pytest.mark.parametrize(
    "settings",
    [{"loss_type": "dapo"}, {"loss_type": "grpo", "importance_level": "sequence", "beta": 0.04, "epsilon": 0.05}],
    ids=["dapo-token", "grpo-sequence-kl"],
)
def test_second_pass_equals_trl_with_the_first_pass_as_old_policy(shared_checkpoint, settings):
    path, _ = shared_checkpoint("qwen3")
    model = nibble.load_model(path)
    apply_lora(model, "all-linear", rank=4, alpha=8.0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.2)
    config = TrainConfig(
        task="grpo", num_generations=4, num_iterations=2, max_completion_len=6, temperature=0.9, **settings
    )
    rewards = build_rewards([{"type": "length", "target": 10, "penalty": 0.1}])
    rollout = Rollout(config, load_tokenizer(path), rewards)
    data = PromptData("p.jsonl", PROMPTS, ["a", "b"], {}, [1, 2])
    batch = {"input_ids": torch.zeros(2, 1, dtype=torch.long), "rows": torch.tensor([1, 0])}
    torch.manual_seed(3)
    with torch.no_grad():
        rolled = rollout.rollout(model, data, batch)
    assert "old_logps" not in rolled and rolled["advantages"].abs().sum() > 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=2.0)

    first = rollout.forward(model, rolled)
    loss, _ = rollout.loss(first, rolled)
    assert torch.equal(rolled["old_logps"], first["logps"].detach())  # kept for the second pass
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()

    second = rollout.forward(model, rolled)
    logps = second["logps"]
    logps.retain_grad()
    loss, metrics = rollout.loss(second, rolled)
    loss.backward()
    mask = rolled["mask"]
    ratio = torch.exp(logps - rolled["old_logps"])[mask.bool()]
    assert (ratio - 1).abs().max() > 0.05  # the step moved the policy: the ratio is real

    objective = rollout.objective
    theirs = logps.detach().double().requires_grad_()
    inputs = {
        "prompt_ids": torch.zeros(len(mask), 1, dtype=torch.long),
        "prompt_mask": torch.ones(len(mask), 1, dtype=torch.long),
        "completion_ids": torch.zeros_like(mask, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": rolled["advantages"].double(),
        "old_per_token_logps": rolled["old_logps"].double(),
    }
    if objective.beta > 0:
        inputs["ref_per_token_logps"] = rolled["ref_logps"].double()
    expected, trl_metrics = trl_loss(objective, inputs, theirs, mask.sum().double())
    expected.backward()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(logps.grad.double(), theirs.grad, rtol=1e-5, atol=1e-8)
    assert metrics["clip_region"].item() == pytest.approx(trl_metrics["clip_ratio/region_mean"][0], abs=1e-6)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params[:2])
