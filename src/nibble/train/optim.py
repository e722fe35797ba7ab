"""AdamW over the trainable parameters, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]],
    lr: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW (fused kernel where torch has one for the device, else foreach).

    Matrices decay; vectors (norm weights, biases) do not, as is usual for transformers.
    """
    decay, no_decay = [], []
    for _, p in named_params:
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})]
    groups = [g for g in groups if g["params"]]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


class WarmupCosine:
    """Linear warmup to the peak, then cosine decay to ``peak * min_ratio`` over ``total_steps``.

    ``factor(s)`` multiplies the peak lr for optimizer step ``s`` (0-based): ``(s + 1) / warmup`` during
    warmup (so the first step already learns), then ``min + (1 - min) * (1 + cos(pi * progress)) / 2``.
    """

    def __init__(self, total_steps: int, warmup_ratio: float = 0.0, min_ratio: float = 0.0):
        self.total_steps = max(1, total_steps)
        self.warmup_steps = math.ceil(warmup_ratio * self.total_steps)
        self.min_ratio = min_ratio

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def apply(self, optimizer: torch.optim.Optimizer, peak_lr: float, step: int) -> float:
        """Set every group's lr for step ``step``; returns it."""
        lr = peak_lr * self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, float]:
        return {"total_steps": self.total_steps, "warmup_steps": self.warmup_steps, "min_ratio": self.min_ratio}
