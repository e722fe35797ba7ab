"""The training loop: accumulate, clip, step, schedule; log, evaluate, checkpoint, stop early or on NaN."""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from tqdm import tqdm

from nibble import kernels
from nibble.data.batching import BatchStream, real_tokens
from nibble.devices import MemoryMeter, autocast, peak_flops, resolve_dtype, to_device
from nibble.errors import Interrupted, NibbleError, StepFailed
from nibble.nn.lora import set_dropout_step
from nibble.train.checkpoint import (
    SHARDS,
    check_optimizer_state,
    discard_checkpoints_after,
    load_checkpoint,
    load_optimizer_state,
    load_rollouts,
    load_sharded,
    load_trainable,
    prune_checkpoints,
    save_checkpoint,
)
from nibble.train.config import TrainConfig
from nibble.train.distributed import (
    DataParallel,
    any_rank,
    barrier,
    current,
    full_value,
    gather_parts,
    host_sum,
    is_sharded,
    sync_gradients,
)
from nibble.train.interrupt import GracefulStop
from nibble.train.metrics import MetricsLog, headline
from nibble.train.optim import WarmupCosine, build_optimizer
from nibble.train.progress import Progress, Window
from nibble.train.rng import check_rng_state, rank_rng_states, rng_state, set_rng_state
from nibble.train.tasks.base import Batch, TaskRun


class Trainer:
    """Runs the optimizer steps of one run.

    Args:
        model: the model, with ``requires_grad`` set on exactly the parameters to train.
        stream: the training batches (its position is part of every checkpoint).
        config: the run's settings.
        out: the output directory (``checkpoints/``, ``metrics.jsonl``).
        total_steps: optimizer steps of the whole run.
        task: what the task gives the run (:class:`nibble.train.tasks.TaskRun`): its forward, its loss and
            named metrics (averaged over each log window and logged with the loss), what the loss averages over
            (under torchrun each rank's loss counts by its share of the global batch's units, so the step equals
            a one-process step) and its evaluation (none: the run is never evaluated).
        eval_batch_size: rows per evaluation batch (default twice the micro-batch).
        on_best: called with the step after an evaluation that lowered the val loss (on every rank).
        meter: the run's memory meter; its peaks go into every train record of metrics.jsonl.
        on_save: called with the directory of each checkpoint once it is complete.
        flops_per_token: the model FLOPs of a step per token; with it each train record of metrics.jsonl has the
            achieved ``tflops_per_s`` and, where the device's peak is known, ``mfu`` (model FLOPs utilization).

    Under torchrun (see :mod:`nibble.train.distributed`) every rank runs the same loop on its slice of each
    batch (``stream`` is built with the rank's ``part``); only rank 0 logs, prints and writes checkpoints, and
    a stop signal on any rank stops every rank after the same step.
    """

    def __init__(
        self,
        *,
        model: nn.Module,
        stream: BatchStream,
        config: TrainConfig,
        out: Path,
        total_steps: int,
        task: TaskRun,
        eval_batch_size: int | None = None,
        on_best: Callable[[int], None] | None = None,
        meter: MemoryMeter | None = None,
        on_save: Callable[[Path], None] | None = None,
        flops_per_token: int | None = None,
        identity: dict[str, str] | None = None,
    ):
        self.model, self.stream, self.config, self.out = model, stream, config, out
        self.identity = identity  # what the run is of, beyond its config (the model's fingerprint), for resuming
        self.forward = task.forward or (lambda m, batch: m(batch["input_ids"], batch["attention_mask"]))
        self.total_steps, self.loss_fn, self.on_best = total_steps, task.loss, on_best
        self.evaluate: Callable[[nn.Module], dict[str, Any]] | None = None
        if task.evaluate is not None:
            eval_batch = eval_batch_size or 2 * config.batch_size
            self.evaluate = lambda m: task.evaluate(m, eval_batch)
        self.meter = meter
        self.on_save = on_save
        self.flops_per_token = flops_per_token
        self.loss_units = task.loss_units or (lambda batch: batch["input_ids"].shape[0])
        self.rollout, self.iterations, self.step_units = task.rollout, task.iterations, task.step_units
        # the micro-batches the steps since the last draw train on (and which are stand-ins), and their rollouts
        self._drawn: tuple[list[Batch], list[bool]] | None = None
        self._rollouts: list[Batch] | None = None
        self.parallel = current()
        self.named_params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self._params = [param for _, param in self.named_params]
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
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.peak_flops = peak_flops(self.device, self.dtype) if self.parallel.is_main else None
        self.progress = Progress()
        self.log = MetricsLog(out / "metrics.jsonl")
        self.checkpoints = out / "checkpoints"
        self.last_checkpoint: Path | None = None
        self.last_eval: dict[str, Any] | None = None
        self._window_state: dict[str, Any] | None = None  # the log window a resumed checkpoint saved
        # DDP, unless FSDP2 sharded the model already (its gradients reduce-scatter as they are computed)
        replicated = self.parallel.active and not is_sharded(self._params)
        self.data_parallel = DataParallel(model, self.forward) if replicated else None

    def autocast(self):
        return autocast(self.device, self.dtype)

    def resume(self, path: Path) -> None:
        """Restore weights, optimizer, data position, progress and RNG from a checkpoint directory. Every tensor
        and value is checked against what this run builds (names, shapes, dtypes, finite, in range) before
        any of it is used (sharded weights, read in place, before training uses them); the first that does not fit
        is one line naming it."""
        trainable, opt_tensors, state, rng = load_checkpoint(path)
        rollouts = load_rollouts(path)
        check_rng_state(rng, state.get("rng"), str(path))
        if (path / SHARDS).is_dir():
            opt_tensors = load_sharded(path, dict(self.named_params), self.optimizer, self.param_names)
        elif is_sharded(self._params):
            raise NibbleError(
                f"{path}: written unsharded (one process, or DDP), and a sharded run (full fine-tuning or --shard-base "
                "under torchrun) resumes only from sharded checkpoints (step-N/shards); resume this one on one "
                "process, or without --shard-base"
            )
        else:
            check_optimizer_state(
                self.optimizer, self.param_names, opt_tensors, state.get("optimizer_groups"), str(path)
            )
            load_trainable(self.model, trainable, str(path))
        try:
            load_optimizer_state(
                self.optimizer, self.param_names, opt_tensors, state.get("optimizer_groups"), str(path)
            )
            self.stream.load_state_dict(state["data"], str(path))
            self._check_position(state, path)
            self.progress = Progress.from_json(state["progress"], str(path))
            self.progress.apply_patience(self.config.early_stopping_patience)
            if self.progress.step % self.iterations:  # between the steps on one drawn batch: draw it again
                self.stream.position -= self.config.grad_accum
                self._drawn = self._draw()
                self._rollouts = self._restore_rollouts(rollouts, path)
            if state.get("scaler") and self.scaler.is_enabled():
                self.scaler.load_state_dict(state["scaler"])
            set_rng_state(rng, state["rng"], self.parallel.rank)
            last_eval = state.get("last_eval")
            if last_eval is not None and not isinstance(last_eval, dict):
                raise TypeError(f"last_eval is {type(last_eval).__name__}")
            self.last_eval = last_eval
            self._window_state = state.get("window")
            Window.from_json(self._window_state, self.progress.step)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError, OverflowError, RuntimeError) as exc:
            raise NibbleError(
                f"{path}: incomplete checkpoint state ({exc!r}); resume from another checkpoint"
            ) from None
        if self.parallel.is_main:
            self.log.truncate_after(self.progress.step)
            discard_checkpoints_after(self.checkpoints, self.progress.step)
        self.last_checkpoint = path

    def _check_position(self, state: dict[str, Any], path: Path) -> None:
        """The data position and the schedule of a checkpoint agree with its step: ``grad_accum`` micro-batches
        per step, the warmup+cosine schedule at that step."""
        progress = Progress.from_json(state["progress"], str(path))
        position, scheduler = state["data"]["position"], state.get("scheduler")
        draws = -(-progress.step // self.iterations)  # the batches drawn: one per `iterations` steps
        if position != draws * self.config.grad_accum:
            per = f" (a batch per {self.iterations} steps)" if self.iterations > 1 else ""
            raise NibbleError(
                f"{path}: data position {position!r} is not step {progress.step} x {self.config.grad_accum} "
                f"micro-batches{per}; resume from another checkpoint, with the same --grad-accum"
            )
        if scheduler is not None:
            total = scheduler.get("total_steps")
            if (
                scheduler.get("name") != "warmup_cosine"
                or scheduler.get("step") != progress.step
                or not (type(total) is int and total > 0)
            ):
                raise NibbleError(
                    f"{path}: scheduler {scheduler!r} is not the warmup+cosine schedule at step {progress.step}; "
                    "resume from another checkpoint"
                )

    def save(self, window: Window | None = None) -> Path:
        """Checkpoint the run at the current step (with the unlogged steps of ``window``, when given)."""
        state = {
            "progress": asdict(self.progress),
            "data": self.stream.state_dict(),
            "scheduler": {"name": "warmup_cosine", "step": self.progress.step, **self.schedule.state_dict()},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "last_eval": self.last_eval,
            "window": window.to_json() if window is not None else None,
            "identity": self.identity,
        }
        path = save_checkpoint(
            self.checkpoints,
            self.progress.step,
            {n: p for n, p in self.named_params},
            self.optimizer,
            self.param_names,
            state,
            yaml.safe_dump(self.config.to_dict(), sort_keys=False),
            rank_rng_states(),  # every rank's generators (a collective)
            self._rollout_state(),  # (a collective too)
        )
        if self.parallel.is_main:
            prune_checkpoints(self.checkpoints, self.config.keep_checkpoints)
        barrier()  # the checkpoint is complete for every rank before any goes on
        self.last_checkpoint = path
        if self.on_save is not None:
            self.on_save(path)
        return path

    def _rollout_state(self) -> dict[str, torch.Tensor] | None:
        """Every rank's rollouts as ``{rank}.{micro-batch}.{name}`` CPU tensors, when the next step trains on them
        again (None otherwise). Under torchrun a collective: each tensor is gathered with its shape."""
        if self._rollouts is None or self.progress.step % self.iterations == 0:
            return None
        mine = {f"{m}.{k}": v.detach() for m, rolled in enumerate(self._rollouts) for k, v in rolled.items()}
        if not self.parallel.active:
            return {f"0.{k}": v.cpu() for k, v in mine.items()}
        state = {}
        for key in sorted(mine):  # the same keys on every rank
            value = mine[key]
            shapes = gather_parts(torch.tensor(value.shape, dtype=torch.long)[None])
            flats = gather_parts(value.reshape(-1))
            for rank, (shape, flat) in enumerate(zip(shapes, flats, strict=True)):
                state[f"{rank}.{key}"] = flat.reshape(shape[0].tolist()).cpu()
        return state

    def _restore_rollouts(self, tensors: dict[str, torch.Tensor], path: Path) -> list[Batch]:
        """This rank's rollouts of the drawn batch from a checkpoint's (see :meth:`_rollout_state`), on the CPU."""
        prefix, ga = f"{self.parallel.rank}.", self.config.grad_accum
        found: dict[int, Batch] = {}
        for key, value in tensors.items():
            if key.startswith(prefix):
                micro, _, name = key[len(prefix) :].partition(".")
                found.setdefault(int(micro), {})[name] = value
        if sorted(found) != list(range(ga)):
            raise NibbleError(
                f"{path}: step {self.progress.step} trains again on the completions sampled at step "
                f"{self.progress.step // self.iterations * self.iterations + 1}, and the checkpoint holds none for "
                f"rank {self.parallel.rank}'s {ga} micro-batches; resume with the same number of processes and "
                "--grad-accum, or from another checkpoint"
            )
        return [found[m] for m in range(ga)]

    def _draw(self) -> tuple[list[Batch], list[bool]]:
        """The next ``grad_accum`` batches of the stream (CPU), and whether each is a stand-in (counts nothing)."""
        batches, stand_ins = [], []
        for _ in range(self.config.grad_accum):
            batches.append(self.stream.next_batch())
            stand_ins.append(self.stream.stand_in)
        return batches, stand_ins

    def _not_finite(self, what: str, value: float) -> NibbleError:
        last = self.last_checkpoint if self.last_checkpoint is not None and self.last_checkpoint.exists() else None
        kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        return NibbleError(
            f"step {self.progress.step + 1}: the {what} is {value} (not finite); training stopped and {kept}; "
            "lower --lr or --max-grad-norm, or train in float32/bfloat16"
        )

    def _measure(self) -> dict[str, Any]:
        """Evaluate the model (left in eval mode); sets ``last_eval``."""
        self.model.eval()
        with torch.no_grad(), self.autocast():
            self.last_eval = self.evaluate(self.model)
        return self.last_eval

    def _evaluate(self) -> None:
        """Evaluate, record the metrics and decide the best checkpoint and the early stop."""
        if self.evaluate is None:
            return
        metrics = self._measure()
        self.model.train()
        p = self.progress
        p.evaluated_step = p.step
        record = {
            "kind": "eval",
            "step": p.step,
            **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))},
        }
        if self.parallel.is_main:
            self.log.write(record)
            tqdm.write(f"eval step {p.step}: {headline(metrics)}")
        if p.best_val_loss is None or metrics["loss"] < p.best_val_loss:
            p.best_val_loss, p.best_step, p.evals_without_improvement = metrics["loss"], p.step, 0
            if self.on_best is not None:
                self.on_best(p.step)
        else:
            p.evals_without_improvement += 1
            patience = self.config.early_stopping_patience
            # (at the last step there is nothing left to stop: the run stays extendable with a larger max_steps)
            if patience and p.evals_without_improvement >= patience and p.step < self.total_steps:
                p.stopped_early = True
                if self.parallel.is_main:
                    tqdm.write(f"early stop at step {p.step}: val loss has not improved for {patience} evaluations")

    def step(self) -> tuple[torch.Tensor, torch.Tensor, int, dict[str, torch.Tensor]]:
        """One optimizer step over ``grad_accum`` micro-batches: drawn from the stream every ``iterations`` steps
        (and rolled out, for a task with a rollout), the same ones in the steps between. Returns its mean loss and
        gradient norm as device tensors (reading them would wait for the device), the number of real tokens it saw
        and the task's metrics (device tensors, averaged over the micro-batches). Under torchrun the loss, the
        metrics and the tokens are this rank's share, summed over the ranks once per log window (see
        :class:`Window`); the shares come from the CPU batches, agreed on the host (:meth:`_shares`), so the step
        never reads the device."""
        cfg = self.config
        loss_sum = torch.zeros((), device=self.device)
        metric_sums: dict[str, torch.Tensor] = {}
        fresh = self._drawn is None or self.progress.step % self.iterations == 0
        set_dropout_step(self.model, cfg.seed, self.progress.step)  # the step's masks: the same on any layout
        if fresh:
            self._drawn = self._draw()
        batches, stand_ins = self._drawn
        # counted on the host, before the batches move
        tokens = sum(real_tokens(batch) for batch in batches)
        if self.rollout is not None and fresh:
            with torch.no_grad(), self.autocast():
                self._rollouts = [self.rollout(self.model, to_device(batch, self.device)) for batch in batches]
        engine = self.data_parallel
        inputs = self._rollouts if self.rollout is not None else batches
        # what each loss averages over, from the CPU batches (a rollout's own host tensors)
        units = [0.0 if stand_in else float(self.loss_units(b)) for b, stand_in in zip(inputs, stand_ins, strict=True)]
        for micro, (batch, share) in enumerate(zip(inputs, self._shares(units), strict=True)):
            batch = batch if self.rollout is not None else to_device(batch, self.device)
            last = micro == cfg.grad_accum - 1
            syncing = engine.no_sync(not last) if engine is not None else nullcontext()
            sync_gradients(self.model, last)  # (FSDP2's own switch; nothing unless the model is sharded)
            with syncing:
                with self.autocast():
                    outputs = engine(batch) if engine is not None else self.forward(self.model, batch)
                loss, metrics = self.loss_fn(outputs, batch)
                if self.parallel.active:
                    # DDP and FSDP average the ranks' gradients: x world undoes that, the share weighs each rank's mean
                    self.scaler.scale(loss * (share * self.parallel.world / cfg.grad_accum)).backward()
                elif self.step_units:
                    self.scaler.scale(loss * (share / cfg.grad_accum)).backward()
                else:
                    self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += self._part(loss, share)
            for name, value in metrics.items():
                metric_sums[name] = metric_sums.get(name, 0) + self._part(value, share)
        self.scaler.unscale_(self.optimizer)
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
        # foreach=None: the foreach kernels where the device has them (CPU, CUDA, XPU), per tensor elsewhere (MPS).
        grad_norm = full_value(torch.nn.utils.clip_grad_norm_(self._params, max_norm, foreach=None))
        self.scaler.step(self.optimizer)  # skips the step when fp16 gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm, tokens, metric_sums

    def _step_failed(self, exc: StepFailed, window: Window, bar: tqdm, before: tuple, saved_at: int) -> NibbleError:
        """The error that ends a run whose step failed, once the last completed step is checkpointed: the data
        position and generators go back to where the step began, so the resumed run retakes it. (Under torchrun the
        other ranks are elsewhere: nothing is saved.)"""
        p = self.progress
        if self.parallel.active:
            return exc
        self.optimizer.zero_grad(set_to_none=True)
        self.stream.position = before[0]
        set_rng_state(*before[1])
        self._check(window, bar)
        if saved_at != p.step:
            self.save(window)
        return StepFailed(
            f"{exc}; step {p.step + 1} did not finish and {self.last_checkpoint} holds step {p.step}: "
            "fix it and run again with --resume"
        )

    def _part(self, value: torch.Tensor, share: float) -> torch.Tensor:
        """A micro-batch's ``value`` as its part of the step's mean (under torchrun: this rank's share of it)."""
        if self.parallel.active or self.step_units:
            return value.detach().float() * share / self.config.grad_accum
        return value.detach().float() / self.config.grad_accum

    def _shares(self, units: list[float]) -> list[float]:
        """This rank's share of the units (rows, target tokens) each global micro-batch's loss averages over (all 1
        in a single process): one host all-reduce per step, for all its micro-batches. With the task's
        ``step_units`` the share is of the whole step's units, times ``grad_accum``: the step's loss is then the mean
        over all its units, however they fall into micro-batches."""
        if not self.parallel.active and not self.step_units:
            return [1.0] * len(units)
        totals = host_sum(units) if self.parallel.active else units
        if self.step_units:
            whole = max(sum(totals), 1e-30) / len(units)
            return [mine / whole for mine in units]
        return [mine / max(total, 1e-30) for mine, total in zip(units, totals, strict=True)]

    def _stop_asked(self, stop: GracefulStop) -> bool:
        """Whether a stop signal arrived, on any rank under torchrun (so that every rank stops after the same
        step; agreed on the host, without waiting for the device)."""
        return any_rank(stop.signum is not None)

    def _check(self, window: Window, bar: tqdm) -> list[tuple[int, float, float]]:
        """Sync the window with the host; stop at its first non-finite loss (or gradient norm, without a grad
        scaler, which handles overflow itself) before anything is saved or evaluated after it."""
        values = window.sync()
        for step, loss, norm in values:
            bad = ("training loss", loss) if not math.isfinite(loss) else None
            if bad is None and not math.isfinite(norm) and not self.scaler.is_enabled():
                bad = ("gradient norm", norm)
            if bad is not None:
                bar.close()
                self.progress.step = step - 1
                raise self._not_finite(*bad)
        return values

    def _report_tuning(self) -> None:
        """After this session's first step on CUDA: one line with the time the Triton 4-bit kernels spent tuning so
        far (compiling and timing their configs for each new shape; later steps reuse the choices)."""
        seconds, shapes = kernels.tuning_time()
        if self.device.type == "cuda" and self.parallel.is_main and shapes:
            note = f"note: by the end of the first step the 4-bit kernels tuned for {shapes} shapes in {seconds:.1f} s"
            print(note, file=sys.stderr)

    def _log(self, window: Window, bar: tqdm, session: tuple[float, int]) -> None:
        """Write the window's metrics line; without a progress bar (stderr is not a terminal) also print it.

        ``session`` is when and at which step this process began training, for the elapsed time and the ETA
        (loading and resuming come before it, so they count in neither, nor in tokens/s).
        """
        values = self._check(window, bar)
        now = time.perf_counter()
        p = self.progress
        p.tokens += window.tokens
        if not self.parallel.is_main:
            return
        record = {
            "kind": "train",
            "step": p.step,
            "loss": sum(loss for _, loss, _ in values) / len(values),
            "lr": window.lr,
            "grad_norm": values[-1][2],
            "epoch": round(self.stream.epoch, 4),
            "tokens_per_s": window.tokens / max(now - window.start, 1e-9),
            **window.metric_means(),
        }
        if self.flops_per_token:
            achieved = record["tokens_per_s"] / self.parallel.world * self.flops_per_token  # per device
            record["tflops_per_s"] = achieved / 1e12
            if self.peak_flops:
                record["mfu"] = achieved / self.peak_flops
        if self.meter is not None:
            peaks = self.meter.read()
            record["peak_rss_bytes"] = peaks["peak_rss_bytes"]
            if peaks["peak_device_bytes"] is not None:
                record["peak_device_bytes"] = peaks["peak_device_bytes"]
        self.log.write(record)
        mfu = {"mfu": f"{record['mfu']:.1%}"} if "mfu" in record else {}
        bar.set_postfix(
            loss=f"{record['loss']:.4f}", lr=f"{window.lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", **mfu
        )
        if bar.disable:
            elapsed = now - session[0]
            eta = elapsed / max(p.step - session[1], 1) * (self.total_steps - p.step)
            mfu_text = f"  mfu {record['mfu']:.1%}" if "mfu" in record else ""
            print(
                f"step {p.step}/{self.total_steps}  loss {record['loss']:.4f}  lr {window.lr:.2e}  "
                f"tokens/s {record['tokens_per_s']:,.0f}{mfu_text}  elapsed {_clock(elapsed)}  eta {_clock(eta)}",
                file=sys.stderr,
                flush=True,
            )

    def train(self) -> Progress:
        """Run until ``total_steps`` (or an early stop); checkpoints as configured and at the end.

        A run resumed at its end (its last step, or an early stop that still holds) trains, records and saves
        nothing; it is only evaluated, for the report. The host reads the device once per log window (and
        before an evaluation or a checkpoint, which must not follow a non-finite step), never per step.
        Progress shows as a bar on a terminal, else as one line per log window on stderr.

        Raises:
            Interrupted: SIGINT/SIGTERM arrived (in the main thread): the step under way was finished and
                checkpointed first; a second signal stops at once, leaving only complete checkpoints.
        """
        cfg, p = self.config, self.progress
        if p.finished(self.total_steps):
            if self.evaluate is not None:
                self._measure()
            return p
        self.out.mkdir(parents=True, exist_ok=True)
        self.model.train()
        quiet = None if self.parallel.is_main else True
        bar = tqdm(total=self.total_steps, initial=p.step, desc="train", disable=quiet, dynamic_ncols=True)
        window = Window.from_json(self._window_state, p.step)
        evaluated_at, saved_at = p.evaluated_step, -1
        session = (time.perf_counter(), p.step)
        with GracefulStop(speak=self.parallel.is_main) as stop:
            if cfg.eval_at_start and p.step == 0 and evaluated_at != 0:
                self._evaluate()
                evaluated_at = 0
            while not p.finished(self.total_steps) and not self._stop_asked(stop):
                lr = self.schedule.apply(self.optimizer, cfg.lr, p.step)
                before = (self.stream.position, rng_state())
                try:
                    loss, grad_norm, tokens, metrics = self.step()
                except StepFailed as exc:
                    bar.close()
                    raise self._step_failed(exc, window, bar, before, saved_at) from None
                p.step += 1
                if p.step == session[1] + 1:
                    self._report_tuning()
                window.add(loss, grad_norm, lr, tokens, metrics)
                bar.update(1)
                if p.step % cfg.log_every == 0 or p.step == self.total_steps:
                    self._log(window, bar, session)
                    window = Window(p.step + 1, time.perf_counter())
                if cfg.eval_every and p.step % cfg.eval_every == 0:
                    self._check(window, bar)
                    with window.paused():
                        self._evaluate()
                    evaluated_at = p.step
                if cfg.save_every and p.step % cfg.save_every == 0:
                    self._check(window, bar)
                    with window.paused():
                        self.save(window)
                    saved_at = p.step
            if self._stop_asked(stop):
                bar.close()
                self._check(window, bar)
                if saved_at != p.step:
                    self.save(window)
                # (a rank stopped by another rank's signal reports SIGTERM, what torchrun sends)
                raise Interrupted(stop.signum or signal.SIGTERM, p.step, self.last_checkpoint)
        if window.losses and p.stopped_early:  # the steps since the last line, logged at the early stop
            self._log(window, bar, session)
            window = Window(p.step + 1, time.perf_counter())
        bar.close()
        self._check(window, bar)
        if evaluated_at != p.step:
            self._evaluate()
        if saved_at != p.step:
            self.save(window)
        return p


def _clock(seconds: float) -> str:
    """``h:mm:ss``."""
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
