"""TRL's GRPO loss as an oracle: ``GRPOTrainer._compute_loss`` driven directly, without a model or generation.

A trainer object carries only the fields ``_compute_loss`` reads, and its log-prob pass returns prepared leaf tensors,
so a test compares the loss and the gradients with respect to the policy's log-probs exactly.
"""

from __future__ import annotations

import types
from collections import defaultdict

import torch
from trl.trainer import grpo_trainer as trl_grpo

from nibble.train.tasks.grpo_loss import GRPOObjective


class OneProcess:
    """The accelerator calls _compute_loss makes, for one process."""

    num_processes = 1

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather


def trl_loss(objective: GRPOObjective, inputs: dict, logps: torch.Tensor, num_items: torch.Tensor):
    """TRL's loss (and its metrics) of ``inputs`` with ``logps`` standing in for its own log-prob pass."""
    trainer = object.__new__(trl_grpo.GRPOTrainer)
    trainer.__dict__.update(
        loss_type=objective.loss_type,
        epsilon_low=objective.epsilon,
        epsilon_high=objective.clip_high,
        beta=objective.beta,
        importance_sampling_level=objective.importance_sampling_level,
        max_completion_length=objective.max_completion_length,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1,
        accelerator=OneProcess(),
        model=types.SimpleNamespace(training=True),
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        _metrics={"train": defaultdict(list)},
    )
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logps, torch.zeros_like(logps), None)
    loss = trainer._compute_loss(None, {**inputs, "num_items_in_batch": num_items})
    return loss, trainer._metrics["train"]
