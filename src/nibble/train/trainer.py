"""The training loop: accumulate, clip, step, schedule; log, evaluate, checkpoint, stop early or on NaN."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm import tqdm

from nibble.data.classify import BatchStream
from nibble.errors import NibbleError
from nibble.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    load_trainable,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from nibble.train.config import TrainConfig
from nibble.train.metrics import MetricsLog, headline
from nibble.train.optim import WarmupCosine, build_optimizer


@dataclass
class Progress:
    """What the loop has done so far (saved as JSON in every checkpoint)."""

    step: int = 0
    tokens: int = 0
    best_val_loss: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


class Trainer:
    """Runs the optimizer steps of one run.

    Args:
        model: the model, with ``requires_grad`` set on exactly the parameters to train.
        stream: the training batches (its position is part of every checkpoint).
        config: the run's settings.
        out: the output directory (``checkpoints/``, ``metrics.jsonl``).
        total_steps: optimizer steps of the whole run.
        loss_fn: ``(outputs, labels) -> scalar loss``.
        evaluate: ``model -> metrics dict with "loss"``, or None when there is no validation data.
        on_best: called with the step after an evaluation that lowered the val loss.
        forward: ``(model, batch) -> outputs`` (inside autocast); default ``model(input_ids, attention_mask)``.
    """

    def __init__(
        self,
        model: nn.Module,
        stream: BatchStream,
        config: TrainConfig,
        out: Path,
        total_steps: int,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        evaluate: Callable[[nn.Module], dict[str, Any]] | None = None,
        on_best: Callable[[int], None] | None = None,
        forward: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None,
    ):
        self.model, self.stream, self.config, self.out = model, stream, config, out
        self.forward = forward or (lambda m, batch: m(batch["input_ids"], batch["attention_mask"]))
        self.total_steps, self.loss_fn, self.evaluate, self.on_best = total_steps, loss_fn, evaluate, on_best
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_params:
            raise NibbleError("nothing to train: no parameter requires a gradient")
        self.optimizer = build_optimizer(
            self.named_params, config.lr, config.weight_decay, (config.adam_beta1, config.adam_beta2), config.adam_eps
        )
        by_id = {id(p): n for n, p in self.named_params}
        ordered = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.param_names = {i: by_id[id(p)] for i, p in enumerate(ordered)}
        self.schedule = WarmupCosine(total_steps, config.warmup_ratio, config.min_lr_ratio)
        self.device = next(p.device for _, p in self.named_params)
        fp16 = config.dtype == "float16"
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=fp16)
        self.autocast_dtype = None if config.dtype == "float32" else config.torch_dtype
        self.progress = Progress()
        self.log = MetricsLog(out / "metrics.jsonl")
        self.checkpoints = out / "checkpoints"
        self.last_checkpoint: Path | None = None
        self.last_eval: dict[str, Any] | None = None

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def resume(self, path: Path) -> None:
        """Restore weights, optimizer, data position, progress and RNG from a checkpoint directory."""
        trainable, opt_tensors, state, rng = load_checkpoint(path)
        load_trainable(self.model, trainable, str(path))
        try:
            load_optimizer_state(self.optimizer, self.param_names, opt_tensors, state["optimizer_groups"], str(path))
            self.stream.load_state_dict(state["data"], str(path))
            self.progress = Progress(**state["progress"])
            if state.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(rng, state["rng"])
        except (KeyError, TypeError, ValueError) as exc:
            raise NibbleError(
                f"{path}: incomplete checkpoint state ({exc!r}); resume from another checkpoint"
            ) from None
        self.log.truncate_after(self.progress.step)
        self.last_checkpoint = path

    def save(self) -> Path:
        state = {
            "progress": asdict(self.progress),
            "data": self.stream.state_dict(),
            "scheduler": {"name": "warmup_cosine", "step": self.progress.step, **self.schedule.state_dict()},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }
        path = save_checkpoint(
            self.checkpoints,
            self.progress.step,
            {n: p for n, p in self.named_params},
            self.optimizer,
            self.param_names,
            state,
            yaml.safe_dump(self.config.to_dict(), sort_keys=False),
        )
        prune_checkpoints(self.checkpoints, self.config.keep_checkpoints)
        self.last_checkpoint = path
        return path

    def _not_finite(self, what: str, value: float) -> NibbleError:
        last = self.last_checkpoint if self.last_checkpoint is not None and self.last_checkpoint.exists() else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return NibbleError(
            f"step {self.progress.step + 1}: the {what} is {value} (not finite); training stopped and {kept}; "
            "lower --lr or --max-grad-norm, or train in float32/bfloat16"
        )

    def _evaluate(self) -> None:
        if self.evaluate is None:
            return
        self.model.eval()
        with torch.no_grad(), self.autocast():
            metrics = self.evaluate(self.model)
        self.model.train()
        self.last_eval = metrics
        p = self.progress
        record = {
            "kind": "eval",
            "step": p.step,
            **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))},
        }
        self.log.write(record)
        tqdm.write(f"eval step {p.step}: {headline(metrics)}")
        if p.best_val_loss is None or metrics["loss"] < p.best_val_loss:
            p.best_val_loss, p.best_step, p.evals_without_improvement = metrics["loss"], p.step, 0
            if self.on_best is not None:
                self.on_best(p.step)
        else:
            p.evals_without_improvement += 1
            patience = self.config.early_stopping_patience
            if patience and p.evals_without_improvement >= patience:
                p.stopped_early = True
                tqdm.write(f"early stop at step {p.step}: val loss has not improved for {patience} evaluations")

    def train(self) -> Progress:
        """Run until ``total_steps`` (or an early stop); checkpoints as configured and at the end."""
        cfg, p = self.config, self.progress
        self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        params = [param for _, param in self.named_params]
        bar = tqdm(total=self.total_steps, initial=p.step, desc="train", disable=None, dynamic_ncols=True)
        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
        evaluated_at = saved_at = -1
        if cfg.eval_at_start and p.step == 0:
            self._evaluate()
            evaluated_at = 0
        while p.step < self.total_steps and not p.stopped_early:
            lr = self.schedule.apply(self.optimizer, cfg.lr, p.step)
            step_loss = 0.0
            for _ in range(cfg.grad_accum):
                batch = self.stream.next_batch()
                with self.autocast():
                    outputs = self.forward(self.model, batch)
                loss = self.loss_fn(outputs, batch["labels"])
                value = loss.item()
                if not math.isfinite(value):
                    bar.close()
                    raise self._not_finite("training loss", value)
                self.scaler.scale(loss / cfg.grad_accum).backward()
                step_loss += value / cfg.grad_accum
                window_tokens += int(batch["attention_mask"].sum())
            self.scaler.unscale_(self.optimizer)
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
            if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
                bar.close()
                raise self._not_finite("gradient norm", grad_norm)
            self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            p.step += 1
            window_loss += step_loss
            window_steps += 1
            bar.update(1)
            if p.step % cfg.log_every == 0 or p.step == self.total_steps:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                p.tokens += window_tokens
                record = {
                    "kind": "train",
                    "step": p.step,
                    "loss": window_loss / window_steps,
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "epoch": round(self.stream.epoch, 4),
                    "tokens_per_s": window_tokens / elapsed,
                }
                self.log.write(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
                window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
            if cfg.eval_every and p.step % cfg.eval_every == 0:
                self._evaluate()
                evaluated_at = p.step
            if cfg.save_every and p.step % cfg.save_every == 0:
                self.save()
                saved_at = p.step
        bar.close()
        if evaluated_at != p.step:
            self._evaluate()
        if saved_at != p.step:
            self.save()
        return p


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint under ``out/checkpoints``, or None."""
    found = list_checkpoints(out / "checkpoints")
    return found[-1][1] if found else None
