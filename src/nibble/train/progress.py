"""What the training loop has done: its :class:`Progress` (saved in every checkpoint) and the log :class:`Window`
(the steps since the last metrics line, kept on the device until it is read)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from nibble.errors import NibbleError
from nibble.train.checkpoint import STATE_FILE, read_state
from nibble.train.distributed import all_sum, current, host_sum


@dataclass
class Progress:
    """What the loop has done so far (saved as JSON in every checkpoint)."""

    step: int = 0
    tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    evaluated_step: int = -1

    @classmethod
    def from_json(cls, data: Any, source: str) -> Progress:
        """The progress saved in a checkpoint; a missing field keeps its default, a wrong one is a NibbleError."""
        if not isinstance(data, dict):
            raise NibbleError(f"{source}: 'progress' must be an object; resume from another checkpoint")
        kinds = {"best_val_loss": (float, int, type(None)), "best_step": (int, type(None)), "stopped_early": (bool,)}
        known = {f.name for f in fields(cls)}
        for key, value in data.items():
            wanted = kinds.get(key, (int,))
            is_bool = isinstance(value, bool)
            if key not in known or not isinstance(value, wanted) or (is_bool and bool not in wanted):
                raise NibbleError(f"{source}: progress '{key}' is {value!r}; resume from another checkpoint")
        progress = cls(**data)
        if progress.step < 0 or progress.tokens < 0:
            raise NibbleError(f"{source}: progress counts are negative; resume from another checkpoint")
        return progress

    def finished(self, total_steps: int) -> bool:
        """Whether a run of ``total_steps`` steps has nothing left to train: it reached them or stopped early."""
        return self.stopped_early or self.step >= total_steps

    def apply_patience(self, patience: int) -> bool:
        """Decide a resumed run's early stop again with ``patience`` (0: never stop): it stays stopped while
        its evaluations without improvement reach the patience. Returns True when a stop is lifted."""
        if self.stopped_early and not (patience and self.evals_without_improvement >= patience):
            self.stopped_early = False
            return True
        return False


def read_progress(checkpoint: Path) -> tuple[Progress, int | None]:
    """A checkpoint's progress and the length of the schedule it was trained on (None when not recorded),
    read from its state.json alone (no tensors).

    Raises:
        NibbleError: no state.json, or one without a valid ``progress`` object.
    """
    state = read_state(checkpoint)
    progress = Progress.from_json(state.get("progress"), str(checkpoint / STATE_FILE))
    scheduler = state.get("scheduler")
    return progress, scheduler.get("total_steps") if isinstance(scheduler, dict) else None


@dataclass
class Window:
    """The steps since the last log line: their losses, task metrics and gradient norms stay on the device (no
    host sync) until :meth:`sync` reads them all at once. Under torchrun each rank holds its share of every loss
    and metric and its own token count; :meth:`sync` sums them over the ranks (every rank calls it at the same
    steps)."""

    first_step: int
    start: float
    losses: list[torch.Tensor | float] = field(default_factory=list)
    grad_norms: list[torch.Tensor | float] = field(default_factory=list)
    lr: float = 0.0
    tokens: int = 0
    metrics: list[dict[str, torch.Tensor | float]] = field(default_factory=list)
    unsummed_tokens: int = 0  # this rank's tokens since the last sync

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside (an evaluation, a checkpoint) out of the window's tokens/s."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - began

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float, tokens: int, metrics: dict) -> None:
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.metrics.append(metrics)
        self.lr = lr
        self.unsummed_tokens += tokens

    def sync(self) -> list[tuple[int, float, float]]:
        """``(step, loss, grad norm)`` of every step so far, as host numbers (one transfer for the new ones)."""
        parallel = current().active
        fresh = [i for i, v in enumerate(self.losses) if isinstance(v, torch.Tensor)]
        if fresh:
            names = list(self.metrics[fresh[0]])
            rows = [torch.stack([self.losses[i], *(self.metrics[i][k] for k in names)]).float() for i in fresh]
            summed = torch.stack(rows)  # [steps, 1 + metrics]: the ranks' shares
            if parallel:
                summed = all_sum(summed)
            norms = torch.stack([self.grad_norms[i].float() for i in fresh]).to(summed.device)
            host = torch.cat([summed, norms[:, None]], dim=1).tolist()  # one transfer for the whole window
            for i, values in zip(fresh, host, strict=True):
                self.losses[i], self.grad_norms[i] = values[0], values[-1]
                self.metrics[i] = dict(zip(names, values[1:-1], strict=True))
        if parallel:
            self.unsummed_tokens = int(host_sum([float(self.unsummed_tokens)])[0])  # host numbers, summed on the host
        self.tokens, self.unsummed_tokens = self.tokens + self.unsummed_tokens, 0
        return [
            (self.first_step + i, loss, norm)
            for i, (loss, norm) in enumerate(zip(self.losses, self.grad_norms, strict=True))
        ]

    def metric_means(self) -> dict[str, float]:
        """The task's metrics averaged over the synced window."""
        names = list(self.metrics[0]) if self.metrics else []
        return {k: sum(m[k] for m in self.metrics) / len(self.metrics) for k in names}

    def to_json(self) -> dict[str, Any]:
        """The synced window (see :meth:`sync`) for a checkpoint, so a resumed run logs the same lines."""
        values = self.sync()
        losses, norms = [v[1] for v in values], [v[2] for v in values]
        return {
            "first_step": self.first_step,
            "losses": losses,
            "grad_norms": norms,
            "lr": self.lr,
            "tokens": self.tokens,
            "metrics": self.metrics,
        }

    @classmethod
    def from_json(cls, data: Any, step: int) -> Window:
        """The window a checkpoint at ``step`` saved (a fresh one when it saved none)."""
        if data is None:
            return cls(step + 1, time.perf_counter())
        losses, norms = data["losses"], data["grad_norms"]
        metrics = data.get("metrics", [{} for _ in losses])  # (checkpoints written before task metrics)
        numbers = [*losses, *norms, data["lr"], *(v for m in metrics for v in m.values())]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
            raise TypeError("window values must be numbers")
        if (
            len(losses) != len(norms)
            or len(metrics) != len(losses)
            or data["first_step"] + len(losses) != step + 1
            or not isinstance(data["tokens"], int)
        ):
            raise ValueError("window does not end at the checkpoint's step")
        return cls(
            data["first_step"], time.perf_counter(), list(losses), list(norms), data["lr"], data["tokens"], metrics
        )
