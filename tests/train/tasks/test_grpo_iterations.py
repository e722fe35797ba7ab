"""``--num-iterations`` 2 on a real rollout: the first pass keeps its own log-probs as the sampling policy's, and
after an optimizer step the second pass's loss and gradients (with respect to its log-probs) equal TRL's
``GRPOTrainer._compute_loss`` given those log-probs as ``old_per_token_logps``: the clipped ratio against the
sampler, no longer 1."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import nibble
from helpers import adapted
from nibble.data.batching import BatchStream
from nibble.io.tokenizer import load_tokenizer
from nibble.model.sampler import SamplingConfig
from nibble.nn import apply_lora
from nibble.nn.lora import lora_layers
from nibble.train.config import TrainConfig
from nibble.train.tasks.base import TaskRun
from nibble.train.tasks.grpo import PromptData, Rollout
from nibble.train.tasks.grpo_rewards import build_rewards
from nibble.train.trainer import Trainer

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
    model = adapted(path)
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


def test_dapo_is_a_token_mean_over_the_whole_step(shared_checkpoint, tmp_path):
    """The same completions of two prompts, trained as one micro-batch or as two (--grad-accum 2, whose token
    counts differ): the step's dapo loss and gradient norm are the same, the token mean over the step (TRL's
    num_items_in_batch), not the mean of the two micro-batches' token means."""
    path, _ = shared_checkpoint("qwen3")
    tokenizer = load_tokenizer(path)
    data = PromptData("p.jsonl", PROMPTS, ["a", "b"], {}, [1, 2])
    config = TrainConfig(
        task="grpo", num_generations=4, max_completion_len=6, lr=1e-3, max_grad_norm=0, dtype="float32"
    )
    rewards = build_rewards([{"type": "length", "target": 10, "penalty": 0.1}])
    stops = tuple(range(0, 1000, 7))
    sampling = SamplingConfig(max_new_tokens=6, stop_token_ids=stops)
    torch.manual_seed(2)
    drawn = Rollout(config, tokenizer, rewards).complete(nibble.load_model(path), data, [0, 1], 4, sampling)

    def complete(model, data, rows, g, sampling):
        """``drawn``'s completions of ``rows`` (prompt indices renumbered), whatever the micro-batch."""
        keep = [i for i, c in enumerate(drawn[0]) if c.prompt_index in rows]
        renumbered = [dataclasses.replace(drawn[0][i], prompt_index=rows.index(drawn[0][i].prompt_index)) for i in keep]
        return renumbered, [drawn[1][i] for i in keep], drawn[2][keep], drawn[3][keep]

    def step(batch_size, grad_accum, step_units=True):
        model = nibble.load_model(path)
        apply_lora(model, "all-linear", rank=4, alpha=8.0)
        with torch.no_grad():
            for layer in lora_layers(model).values():
                layer.lora_A.weight.fill_(0.02)
                layer.lora_B.weight.fill_(0.01)
        cfg = dataclasses.replace(config, batch_size=batch_size, grad_accum=grad_accum)
        rollout = Rollout(cfg, tokenizer, rewards)
        rollout.complete = complete
        task = TaskRun(
            train=data, val=None, loss=rollout.loss, summary="", forward=rollout.forward, loss_units=rollout.units,
            rollout=lambda model, batch: rollout.rollout(model, data, batch), step_units=step_units,
        )  # fmt: skip
        stream = BatchStream(data, batch_size // 4, 0, cfg.seed)
        trainer = Trainer(model=model, stream=stream, config=cfg, out=tmp_path, total_steps=1, task=task)
        loss, norm, _, _ = trainer.step()
        return loss.item(), norm.item(), [rollout.units(r) for r in trainer._rollouts]

    whole, split = step(8, 1), step(4, 2)
    assert split[2][0] != split[2][1] and sum(split[2]) == whole[2][0]  # unequal micro-batches, the same tokens
    assert whole[0] != 0 and split[0] == pytest.approx(whole[0], rel=1e-5)
    assert split[1] == pytest.approx(whole[1], rel=1e-5)
    unweighted = step(4, 2, step_units=False)  # what the mean of the micro-batches' means would have been
    assert unweighted[1] != pytest.approx(whole[1], rel=1e-3)
