"""GRPO's objective and its variants, over precomputed per-token log-probs (no model, no sampling here).

Names and defaults follow TRL's ``GRPOConfig`` so configs carry over: ``loss_type`` (``grpo``: each sequence's
token mean, then the batch mean, Shao et al. 2024; ``dr_grpo``: a token sum over rows x ``max_completion_length``,
no length or std normalization, Liu et al. 2025; ``dapo``: a token mean over the whole batch with decoupled clip
bounds, Yu et al. 2025; ``bnpo``: the token mean of the micro-batch), ``epsilon`` / ``epsilon_high`` (the clip range
``[1 - epsilon, 1 + epsilon_high]``), ``importance_sampling_level`` (``sequence``: one ratio per sequence, the
geometric mean of its token ratios, GSPO, Zheng et al. 2025), ``beta`` (the weight of the k3 estimate of
KL(policy || reference)) and ``scale_rewards`` (divide advantages by the group's, the batch's, or no std).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from nibble.errors import NibbleError

LossType = Literal["grpo", "dr_grpo", "dapo", "bnpo"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "dr_grpo", "dapo", "bnpo")
IMPORTANCE_LEVELS: tuple[str, ...] = ("token", "sequence")
SCALE_REWARDS: tuple[str, ...] = ("group", "batch", "none")
# Added to the std before dividing, so a group whose rewards are all equal gets advantages of 0, not NaN.
STD_EPS = 1e-4


@dataclass(frozen=True, kw_only=True)
class GRPOObjective:
    """One GRPO variant: what the loss of a batch of scored completions is.

    ``max_completion_length`` is ``dr_grpo``'s constant denominator (the longest completion the sampler may return).
    """

    loss_type: LossType = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    importance_sampling_level: Literal["token", "sequence"] = "token"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    max_completion_length: int = 512

    def __post_init__(self) -> None:
        checks = (
            ("loss_type", self.loss_type, LOSS_TYPES),
            ("importance_sampling_level", self.importance_sampling_level, IMPORTANCE_LEVELS),
            ("scale_rewards", self.scale_rewards, SCALE_REWARDS),
        )
        for key, value, allowed in checks:
            if value not in allowed:
                raise NibbleError(f"'{key}' {value!r} is not known; use one of {', '.join(allowed)}")
        if not 0 <= self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise NibbleError("'epsilon' must be in [0, 1) and 'epsilon_high' >= 0 (the clip range is [1-ε, 1+ε_high])")
        if self.beta < 0:
            raise NibbleError(f"'beta' {self.beta} is negative; use 0 (no reference) or a positive KL weight")
        if self.max_completion_length < 1:
            raise NibbleError(f"'max_completion_length' {self.max_completion_length} must be at least 1")

    @property
    def clip_high(self) -> float:
        """The upper clip offset: ``epsilon_high``, or ``epsilon`` when unset."""
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads the reference's log-probs (β > 0); at β = 0 no reference pass runs at all."""
        return self.beta > 0


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """[N] each completion's reward minus its group's mean, over the group's (or batch's) std unless ``"none"``.

    ``rewards`` [N] holds N / G groups of G consecutive completions of one prompt. The std is Bessel-corrected.
    """
    groups = rewards.view(-1, num_generations)  # [N/G, G]
    advantages = (groups - groups.mean(dim=1, keepdim=True)).reshape(-1)
    if scale_rewards == "group":
        std = groups.std(dim=1, keepdim=True).expand_as(groups).reshape(-1)
    elif scale_rewards == "batch":
        std = rewards.std().expand_as(rewards)
    else:
        return advantages
    return advantages / (std + STD_EPS)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """[B, T] the k3 estimate of KL(policy || reference) per token: exp(r) - r - 1 with r = ref - policy."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def grpo_loss(
    objective: GRPOObjective,
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    num_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate loss of one micro-batch and its metrics.

    Args:
        logps: [B, T] the policy's log-probs of the completion tokens (with gradients).
        old_logps: [B, T] the sampling policy's (detached; equal to ``logps`` on the first iteration).
        advantages: [B] group-relative advantages (:func:`group_advantages`).
        mask: [B, T] 1 for completion tokens that count, 0 for padding (and masked truncated completions).
        ref_logps: [B, T] the reference's log-probs; required when ``objective.beta > 0``.
        num_tokens: ``dapo``'s denominator, the completion tokens of the whole batch this micro-batch is part of
            (default: this micro-batch's).

    Returns:
        The loss, and ``clip_low`` / ``clip_high`` / ``clip_region`` (the fraction of tokens -- of sequences at the
        sequence level -- whose ratio the clip held) and ``kl`` (when β > 0), as detached scalars.
    """
    mask = mask.to(logps.dtype)
    advantages = advantages.unsqueeze(1)  # [B, 1]
    log_ratio = logps - old_logps
    if objective.importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)  # [B, 1]
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - objective.epsilon, 1 + objective.clip_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)  # [B, T] or [B, 1]
    metrics: dict[str, torch.Tensor] = {}
    if objective.beta > 0:
        if ref_logps is None:
            raise ValueError("beta > 0 needs the reference log-probs")
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + objective.beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask)
    loss = reduce_loss(objective, per_token * mask, mask, num_tokens)
    low = (ratio < 1 - objective.epsilon) & (advantages < 0)
    high = (ratio > 1 + objective.clip_high) & (advantages > 0)
    metrics["clip_low"] = masked_mean(low.to(mask.dtype), mask)
    metrics["clip_high"] = masked_mean(high.to(mask.dtype), mask)
    metrics["clip_region"] = masked_mean((low | high).to(mask.dtype), mask)
    return loss, metrics


def reduce_loss(
    objective: GRPOObjective, weighted: torch.Tensor, mask: torch.Tensor, num_tokens: torch.Tensor | float | None
) -> torch.Tensor:
    """The scalar loss from the masked per-token losses ``weighted`` [B, T], as ``objective.loss_type`` says."""
    if objective.loss_type == "grpo":
        return (weighted.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if objective.loss_type == "bnpo":
        return weighted.sum() / mask.sum().clamp(min=1.0)
    if objective.loss_type == "dr_grpo":
        return weighted.sum() / (weighted.size(0) * objective.max_completion_length)
    total = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=weighted.dtype)
    return weighted.sum() / total.clamp(min=1.0)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the unmasked tokens; [B, 1] values (sequence level) average over the rows."""
    if values.shape[1] == 1:
        return values.mean()
    return (values * mask).sum() / mask.sum().clamp(min=1.0)
