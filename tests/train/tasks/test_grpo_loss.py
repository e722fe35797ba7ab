"""GRPO losses against TRL's GRPOTrainer._compute_loss on the same log-probs, advantages and masks.

TRL's loss method is driven directly: a trainer object carrying only the fields ``_compute_loss`` reads, whose
log-prob pass returns prepared leaf tensors, so the loss and the gradients with respect to the policy's log-probs
are compared exactly (no generation, no model).
"""

from __future__ import annotations

import pytest
import torch

from nibble.errors import NibbleError
from nibble.train.tasks.grpo_loss import GRPOObjective, group_advantages, grpo_loss

pytest.importorskip("trl.trainer.grpo_trainer")
from grpo_oracle import trl_loss  # noqa: E402

G = 4
MAX_LEN = 9


def scored_batch(seed: int, rows: int = 8):
    """Completions of ``rows / G`` prompts: log-probs near the old ones, rewards, ragged masks."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(rows, MAX_LEN, generator=gen, dtype=torch.float64) * 3
    logps = old + torch.randn(rows, MAX_LEN, generator=gen, dtype=torch.float64) * 0.3
    ref = old + torch.randn(rows, MAX_LEN, generator=gen, dtype=torch.float64) * 0.2
    lengths = torch.randint(1, MAX_LEN + 1, (rows,), generator=gen)
    mask = (torch.arange(MAX_LEN) < lengths[:, None]).long()
    rewards = torch.randint(0, 3, (rows,), generator=gen).double()
    return logps, old, ref, mask, rewards


VARIANTS = [
    GRPOObjective(loss_type=loss, importance_sampling_level=level, beta=beta, epsilon_high=high)
    for loss in ("grpo", "dr_grpo", "dapo", "bnpo")
    for level, beta, high in (("token", 0.0, None), ("sequence", 0.04, 0.28), ("token", 0.1, 0.28))
]


@pytest.mark.parametrize("objective", VARIANTS, ids=lambda o: f"{o.loss_type}-{o.importance_sampling_level}-{o.beta}")
def test_loss_and_gradients_equal_trl(objective):
    seed = VARIANTS.index(objective)
    objective = GRPOObjective(**{**objective.__dict__, "max_completion_length": MAX_LEN})
    logps, old, ref, mask, rewards = scored_batch(seed=seed)
    advantages = group_advantages(rewards, G, objective.scale_rewards)
    ours = logps.clone().requires_grad_()
    theirs = logps.clone().requires_grad_()
    num_tokens = mask.sum()
    loss, metrics = grpo_loss(objective, ours, old, advantages, mask, ref_logps=ref, num_tokens=num_tokens)
    inputs = {
        "prompt_ids": torch.zeros(len(mask), 1, dtype=torch.long),
        "prompt_mask": torch.ones(len(mask), 1, dtype=torch.long),
        "completion_ids": torch.zeros_like(mask),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
    }
    expected, trl_metrics = trl_loss(objective, inputs, theirs, num_tokens.double())
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    loss.backward()
    expected.backward()
    assert ours.grad.abs().sum() > 0
    torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-12, atol=1e-12)
    for name in ("low", "high", "region"):
        assert metrics[f"clip_{name}"].item() == pytest.approx(trl_metrics[f"clip_ratio/{name}_mean"][0])
    if objective.beta > 0:
        assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"][0])


def test_clipping_is_exercised():
    """The batches above move ratios past the clip bounds, so the clip branch is what the comparison checked."""
    logps, old, _, mask, rewards = scored_batch(seed=1)
    advantages = group_advantages(rewards, G)
    _, metrics = grpo_loss(GRPOObjective(), logps, old, advantages, mask)
    assert 0 < metrics["clip_region"].item() < 1


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_follow_trl(scale):
    """TRL's formulas: reward minus group mean, over the group's / batch's Bessel std + 1e-4, or unscaled."""
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    groups = rewards.view(2, G)
    centred = (groups - groups.mean(1, keepdim=True)).flatten()
    std = {"group": groups.std(1).repeat_interleave(G), "batch": rewards.std().expand(8), "none": None}[scale]
    expected = centred if std is None else centred / (std + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, G, scale), expected)
    assert group_advantages(rewards, G, scale)[4:].abs().max() == 0  # equal rewards: no signal, not NaN


def test_first_iteration_ratio_is_one():
    """With the old log-probs equal to the policy's, each token's gradient is -A / tokens at either level (at the
    sequence level d ratio / d logp_t = 1 / |o|, and the sequence's |o| tokens share it)."""
    logps, _, _, mask, rewards = scored_batch(seed=3)
    advantages = group_advantages(rewards, G)
    for level in ("token", "sequence"):
        policy = logps.clone().requires_grad_()
        objective = GRPOObjective(loss_type="bnpo", importance_sampling_level=level)
        loss, _ = grpo_loss(objective, policy, logps, advantages, mask)
        loss.backward()
        torch.testing.assert_close(loss, -(advantages[:, None] * mask).sum() / mask.sum())
        torch.testing.assert_close(policy.grad, -(advantages[:, None] * mask) / mask.sum())


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"loss_type": "ppo"}, "loss_type"),
        ({"importance_sampling_level": "step"}, "importance_sampling_level"),
        ({"epsilon": 1.5}, "epsilon"),
        ({"beta": -1.0}, "beta"),
        ({"scale_rewards": "max"}, "scale_rewards"),
    ],
)
def test_bad_settings_are_one_line(fields, needle):
    with pytest.raises(NibbleError, match=needle):
        GRPOObjective(**fields)
