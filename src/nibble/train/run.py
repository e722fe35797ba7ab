"""One training run, whatever the task: model (qlora | lora | full) -> trainer -> adapter or model, report, plots.

The task (:mod:`nibble.train.tasks`) reads and checks its data and gives the loss, the evaluation and the files
its exports carry; :class:`Run` does the rest as a lifecycle: ``setup`` (dtype, plan, model, output directory,
trainer) -> ``resume`` -> ``train`` -> ``finish`` (export, report, plots) -> ``close``. Everything a user can get
wrong is checked before the output directory is touched. The final adapter (``OUT/adapter``, PEFT layout) or model
(``OUT/model``, a Hugging Face checkpoint) is written under a temporary name and renamed, so it only exists once
it is complete.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibble import kernels
from nibble.data.batching import BatchStream
from nibble.devices import MemoryMeter, describe, dtype_name, resolve_device, resolve_dtype
from nibble.errors import NibbleError
from nibble.io.files import model_fingerprint, read_json_object, staged_dir, write_text_atomic
from nibble.io.lock import locked_directory
from nibble.io.tokenizer import Tokenizer, load_tokenizer
from nibble.model.config import ModelConfig
from nibble.model.loading import resolve_model_dir
from nibble.model.memory import RunPlan, estimate_bytes
from nibble.model.model import fused_elementwise
from nibble.model.moe import RouterLoss, sparse_blocks
from nibble.nn import apply_lora
from nibble.nn.lora import trainable_parts
from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights
from nibble.train import distributed
from nibble.train.config import TrainConfig
from nibble.train.export import copy_export, export
from nibble.train.metrics import MetricsLog, plot_run
from nibble.train.outdir import (
    check_output,
    check_same_run,
    drop_replaced_run,
    finished_already,
    global_micro_batch,
    prepare_output,
    settle_replaced_run,
)
from nibble.train.planning import check_lora_rank, fit_to_memory, plan_options, train_flops_per_token
from nibble.train.progress import Progress, read_progress
from nibble.train.report import open_reporters, report_targets
from nibble.train.rng import deterministic, seed_everything
from nibble.train.tasks import TaskRun, get_task
from nibble.train.trainer import Trainer


def prepare_model(model: nn.Module, config: TrainConfig) -> list[str]:
    """Set what trains for the method; returns the LoRA-wrapped module paths (empty for full)."""
    if config.method == "full":
        for name, p in model.named_parameters():
            is_embedding = name.startswith("model.embed_tokens.")
            p.requires_grad_(config.train_embeddings or not is_embedding)
        return []
    wrapped = apply_lora(
        model,
        config.lora_targets,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
    )
    heads = [model.score] if hasattr(model, "score") else []
    if config.train_router:
        heads += [block.gate for block in sparse_blocks(model)]
    for head in heads:
        # Trainable weights stay fp32 (master weights); autocast runs the matmuls in the compute dtype.
        head.float()
        head.weight.requires_grad_(True)
    return wrapped


def fuse_elementwise(model: nn.Module, device: torch.device) -> None:
    """``--compile``: run the model's norms, RoPE and SwiGLU through torch.compile's fused kernels.

    Raises:
        NibbleError: torch.compile cannot build kernels on ``device`` (no C++ compiler, no Triton).
    """
    ops = fused_elementwise()
    try:
        ops.swiglu(torch.ones(2, 8, device=device), torch.ones(2, 8, device=device))
    except Exception as exc:  # inductor reports a missing toolchain through many exception types
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise NibbleError(
            f"--compile: torch.compile cannot build kernels on {device} ({reason}); install a C++ compiler (CPU) "
            "or Triton (GPU), or leave --compile off"
        ) from None
    model.use_elementwise(ops)
    print("compile: norms, RoPE and SwiGLU fused by torch.compile (built on first use, cached on disk)", flush=True)


@dataclass
class TrainResult:
    """What a training run left behind (the value :func:`nibble.train` returns).

    ``final`` is ``OUT/adapter`` (LoRA methods) or ``OUT/model`` (full); ``best`` the export at the lowest
    val loss (None without validation data); ``checkpoint`` the last resumable checkpoint; ``report`` the
    final evaluation (``{}`` without validation data); ``step`` the optimizer steps trained in all.
    """

    output: Path
    final: Path
    best: Path | None
    checkpoint: Path | None
    report: dict[str, Any]
    step: int
    stopped_early: bool

    @property
    def metrics_file(self) -> Path:
        return self.output / "metrics.jsonl"

    @property
    def metrics(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl: ``kind`` "train" (per log window) or "eval", with its ``step``."""
        return MetricsLog(self.metrics_file).records()


def _result(out: Path, final: Path, progress: Progress, checkpoint: Path | None) -> TrainResult:
    report_file = out / "eval_report.json"
    fix = "restore it, or delete it (metrics.jsonl holds the final evaluation's scores too)"
    report = read_json_object(report_file, fix) if report_file.is_file() else {}
    best = out / "best" if (out / "best").is_dir() else None
    return TrainResult(out, final, best, checkpoint, report, progress.step, progress.stopped_early)


def _gb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e9:.3f} GB"


def run_training(config: TrainConfig) -> TrainResult:
    """Read the task's data, load the model for ``config.method`` on ``config.device``, train it, export.

    ``dtype`` auto, ``method`` auto and a ``memory_budget`` are resolved first (and printed); the resolved values
    are what ``config.yaml`` and the exported ``nibble.json`` record. Resuming a run that is already finished
    (its last step reached, or stopped early with a patience that still holds) changes nothing on disk.
    Resuming with a larger ``max_steps`` (or ``epochs``) trains the extra steps; the learning rate of every step
    from then on is the one a run of the new length has at that step (the warmup + cosine schedule is
    recomputed for the new length).

    The run holds an exclusive lock on its output directory from before it reads anything there until it
    ends (see :func:`nibble.io.lock.locked_directory`): a second run on the same output is refused.

    Under ``torchrun`` every rank runs this (see :mod:`nibble.train.distributed`): the ranks must agree on the
    config, each computes on its own device, and only rank 0 prints, takes the lock and writes the output
    directory.

    Raises:
        NibbleError: a bad option or input, or a directory in use (naming the pid holding it).
        Interrupted: SIGINT/SIGTERM stopped the run (after a checkpoint; see :meth:`Trainer.train`).
    """
    part = distributed.from_environment()
    distributed.quiet_other_ranks(part)
    model_dir = resolve_model_dir(config.model)
    if not (model_dir / "config.json").is_file():
        raise NibbleError(f"{model_dir}: not a model directory (no config.json); check --model")
    tokenizer = load_tokenizer(model_dir)
    model_config = ModelConfig.from_hf(model_dir)
    tokenizer.check_fits(model_config.vocab_size, model_dir)
    task = get_task(config.task).setup(config, model_dir, tokenizer)
    if config.shard_base and not part.active:
        raise NibbleError(
            "--shard-base splits the frozen base over the ranks of a torchrun launch, and this is one process; "
            "start it with torchrun --nproc-per-node N (N >= 2), or drop --shard-base"
        )
    device = resolve_device(distributed.rank_device(config.device, part))
    distributed.start(part, device, config.dist_backend)
    try:
        distributed.check_same_config(config.to_dict())
        out = Path(config.output)
        check_lora_rank(config, model_config)
        with locked_directory(out) if part.is_main else nullcontext():
            with distributed.main_first() as main:
                if main:
                    settle_replaced_run(out)
            try:
                with deterministic(config.deterministic):
                    run = Run(
                        config=config, model_dir=model_dir, tokenizer=tokenizer, task=task, device=device, part=part
                    )
                    result = run.setup()
                    if result is None:
                        try:
                            run.resume()
                            result = run.finish(run.train())
                        finally:
                            run.close()
            except BaseException:
                if part.is_main:
                    settle_replaced_run(out)
                raise
        distributed.barrier()  # no rank leaves the group while another still works in it
        return result
    finally:
        run = None  # the model and its DDP/FSDP state go before the group they use (a later teardown can abort)
        distributed.stop()


class Run:
    """One training run inside its locked output directory: :meth:`setup` -> :meth:`resume` -> :meth:`train` ->
    :meth:`finish` -> :meth:`close` (see :func:`run_training`, which calls them in that order)."""

    def __init__(
        self,
        *,
        config: TrainConfig,
        model_dir: Path,
        tokenizer: Tokenizer,
        task: TaskRun,
        device: torch.device,
        part: distributed.Parallel,
    ):
        self.config, self.model_dir, self.tokenizer, self.task = config, model_dir, tokenizer, task
        self.device, self.part, self.out = device, part, Path(config.output)
        self.model_config = ModelConfig.from_hf(model_dir)
        self.plan: RunPlan | None = None
        self.resume_from: Path | None = None

    @property
    def lora_method(self) -> bool:
        """Whether only adapters train (exports of a sharded model gather the adapter alone, not the base)."""
        return self.config.method != "full"

    def setup(self) -> TrainResult | None:
        """Resolve dtype and plan, load the model, make the output directory ready and build the trainer; the
        result of a resumed run that has nothing left to do (None otherwise)."""
        self.resume_from = check_output(self.out, self.config)
        self._resolve()
        self.stream = BatchStream(
            self.task.train,
            self.config.batch_size // self.task.rows_per_example * self.part.world,
            self.tokenizer.pad_id,
            self.config.seed,
            self.task.sample_groups,
            part=(self.part.rank, self.part.world),
        )
        cfg = self.config
        # (each drawn batch feeds `iterations` steps: GRPO's num_iterations)
        steps_per_epoch = math.ceil(self.stream.batches_per_epoch / cfg.grad_accum) * self.task.iterations
        self.total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        self.final_dir = self.out / ("model" if cfg.method == "full" else "adapter")
        if self.resume_from is not None and finished_already(
            self.out, self.final_dir, self.resume_from, self.total_steps, cfg
        ):
            return _result(self.out, self.final_dir, read_progress(self.resume_from)[0], self.resume_from)
        seed_everything(cfg.seed)
        # The first optimizer imports torch._dynamo: about 150 MB of code in the RSS (measured on CPU), the same for
        # every model. Imported before the meter starts, it stays out of the memory the run is measured to use.
        import torch._dynamo  # noqa: F401

        self.meter = MemoryMeter(self.device)
        self._load_model()
        self.estimate = estimate_bytes(self.model_config, self._plan_options(self._cache_weights()))
        if self.task.prepare is not None:
            self.task.prepare(self.model, cfg.eval_batch_size or 2 * cfg.batch_size, cfg.torch_dtype)
        with distributed.main_first() as main:
            if main:
                prepare_output(self.out, cfg, self.resume_from)
        self._build_trainer()
        return None

    def _resolve(self) -> None:
        """The dtype (``auto`` resolved for the device), then the plan (``method`` auto or a memory budget), then
        the per-rank micro-batch a resumed run keeps its global micro-batch with."""
        asked = self.config.dtype
        self.config = replace(self.config, dtype=dtype_name(resolve_dtype(asked, self.device)))
        print(describe(self.device, self.config.torch_dtype, asked), flush=True)
        self.config, self.plan, source = fit_to_memory(
            self.config, self.model_config, self.task.num_labels, self.device
        )
        if self.plan is not None:
            print(f"plan: {self.plan.describe()} ({source})", flush=True)
            get_task(self.config.task).check(self.config)  # the plan's method and micro-batch must suit the task too
        self.config = global_micro_batch(self.config, self.resume_from, self.part, self.task.rows_per_example)
        self.fingerprint = model_fingerprint(self.model_dir)
        if self.resume_from is not None:
            check_same_run(self.resume_from, self.config, self.fingerprint)

    def _plan_options(self, cache_budget: int):
        opts = plan_options(self.config, self.model_config, num_labels=self.task.num_labels, device=self.device)
        # activations scale with the real tokens of the run's own largest micro-batch
        draws = -(-self.total_steps // self.task.iterations)
        tokens = self.stream.most_tokens(draws * self.config.grad_accum)
        return replace(opts, cache_budget=cache_budget, batch_tokens=tokens)

    def _load_model(self) -> None:
        """The model with its head, prepared for the method, sharded (FSDP2: full fine-tuning, or a sharded base),
        with fused element-wise ops under ``--compile``."""
        from nibble.model import load_model

        cfg, part, device = self.config, self.part, self.device
        # FSDP2 for full fine-tuning and a sharded base; else the LoRA methods replicate the model (DDP, in the Trainer)
        self.sharded = part.active and (not self.lora_method or cfg.shard_base)
        model = load_model(
            self.model_dir,
            task=get_task(cfg.task).head,
            num_labels=self.task.num_labels,
            quantize=cfg.quant_spec if cfg.method == "qlora" else None,
            dtype=torch.float32 if cfg.method == "full" else cfg.torch_dtype,
            # a base sharded because it may not fit the device is loaded on the host; sharding moves it a block at
            # a time
            device=torch.device("cpu") if self.sharded and self.lora_method else device,
            pooling=cfg.pooling,
        )
        prepare_model(model, cfg)
        self.n_all = sum(p.numel() for p in model.parameters()) + sum(  # 4-bit projections and experts
            m.qweight.numel for m in model.modules() if getattr(m, "qweight", None) is not None
        )
        if self.sharded:
            # full fine-tuning in 16 bits gathers its fp32 master weights in the compute dtype
            gather = cfg.torch_dtype if cfg.method == "full" and cfg.torch_dtype != torch.float32 else None
            distributed.shard_model(model, device, gather)
        if part.rank:  # its own dropout masks (DDP gives every rank rank 0's initial trainable weights)
            torch.manual_seed(cfg.seed + part.rank)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        if cfg.compile:
            fuse_elementwise(model, device)
        self.model = model

    def _cache_weights(self) -> int:
        """Keep dense copies of frozen 4-bit weights within the cache budget; returns the budget."""
        cfg, dtype = self.config, self.config.torch_dtype
        if why := kernels.fp32_units_reason(dtype, self.device):
            print(
                f"dtype: {cfg.dtype} here ({why}): matmuls and attention take {cfg.dtype} operands and give "
                "results in it, multiplied on fp32 units (exact products, fp32 sums)",
                flush=True,
            )
        if cfg.method != "qlora":
            return 0
        if self.sharded:
            print(f"cache: none (the frozen 4-bit base is sharded over {self.part.world} ranks)", flush=True)
            return 0
        budget = cache_budget_bytes(self.model, dtype, cfg.cache_budget_mb)
        if self.plan is not None:  # the copies fill at most what the planned run leaves of the budget
            budget = max(min(budget, self.plan.budget_bytes - self.plan.estimate_bytes), 0)
        cached, total_q, used = cache_dense_weights(self.model, budget, dtype)
        print(f"cache: {cached}/{total_q} frozen 4-bit projections kept dequantized ({used / 2**20:.1f} MiB)")
        return budget

    def _export(self, final: Path, step: int) -> None:
        """Export the model at ``step`` to ``final`` (a sharded model gathered first: every rank calls this)."""
        with distributed.gathered(self.model, trainable_only=self.lora_method):
            if self.part.is_main:
                export(
                    self.model,
                    config=self.config,
                    tokenizer=self.tokenizer,
                    final=final,
                    task=self.task,
                    model_dir=self.model_dir,
                    step=step,
                )

    def _build_trainer(self) -> None:
        def on_save(path: Path) -> None:
            if self.part.is_main:
                drop_replaced_run(self.out)  # what --overwrite set aside is no longer needed

        task, moe = self.task, self.model.config.moe
        if moe is not None:  # the load-balancing loss is logged, and added when it has a weight
            self.router_weight = self.config.router_aux_weight(moe.router_aux_loss_coef)
            task = replace(task, loss=RouterLoss(self.model, task.loss, self.router_weight))
        self.trainer = Trainer(
            model=self.model,
            stream=self.stream,
            config=self.config,
            out=self.out,
            total_steps=self.total_steps,
            task=task,
            eval_batch_size=self.config.eval_batch_size or 2 * self.config.batch_size,
            on_best=lambda step: self._export(self.out / "best", step),
            meter=self.meter,
            on_save=on_save,
            flops_per_token=train_flops_per_token(self.model_config, self.config.method),
            identity={"model": self.fingerprint},
        )

    def resume(self) -> None:
        """Restore the trainer from the checkpoint (if any) and open the metrics mirrors."""
        trainer = self.trainer
        if self.resume_from is not None:
            trainer.resume(self.resume_from)
            print(f"resumed from {self.resume_from} at step {trainer.progress.step}", flush=True)
        if self.part.is_main:
            targets = report_targets(self.config.report_to)
            trainer.log.mirrors = open_reporters(targets, self.out, self.config.to_dict(), trainer.progress.step)
        n_train = sum(p.numel() for _, p in trainer.named_params)
        print(
            f"train: {self.task.summary}; {self.config.method}, {n_train:,} of {self.n_all:,} weights trainable; "
            f"{self.total_steps} steps",
            flush=True,
        )
        if self.model.config.moe is not None:
            parts = ", ".join(f"{part} {n:,}" for part, n in trainable_parts(self.model).items())
            print(f"trainable by part: {parts}; router aux loss weight {self.router_weight:g}", flush=True)

    def train(self) -> Progress:
        """Train until the last step, an early stop or a signal."""
        return self.trainer.train()

    def finish(self, progress: Progress) -> TrainResult:
        """Export the final model (a copy of ``best/`` when the last evaluation was the best), then on rank 0 the
        report, the plots and the closing line."""
        memory = {
            "device": str(self.device),
            **self.meter.read(),
            "estimate_bytes": self.estimate,
            "budget_bytes": self.plan.budget_bytes if self.plan is not None else None,
        }
        best, out, trainer = self.out / "best", self.out, self.trainer
        # (decided by rank 0, which wrote best/: the export of a sharded model needs every rank)
        from_best = distributed.broadcast_text("best" if progress.best_step == progress.step and best.is_dir() else "")
        if from_best:
            if self.part.is_main:  # best/ holds exactly this model: copied, not exported twice
                copy_export(best, self.final_dir)
        else:
            self._export(self.final_dir, progress.step)
        if not self.part.is_main:
            last = trainer.last_checkpoint
            return TrainResult(out, self.final_dir, None, last, {}, progress.step, progress.stopped_early)
        report: dict[str, Any] = {}
        if trainer.last_eval is not None:
            report = {"step": progress.step, **trainer.last_eval, "memory": memory}
            write_text_atomic(out / "eval_report.json", json.dumps(report, indent=2) + "\n")
            print(self.task.report(report), flush=True)
        with staged_dir(out / "plots", overwrite=True) as plots:
            plot_run(trainer.log.records(), report or None, self.task.labels, plots, name=out.resolve().name)
        self._print_done(memory)
        return _result(out, self.final_dir, progress, trainer.last_checkpoint)

    def _print_done(self, memory: dict[str, Any]) -> None:
        peak = "" if memory["peak_device_bytes"] is None else f", device peak {_gb(memory['peak_device_bytes'])}"
        budget = f", budget {_gb(self.plan.budget_bytes)}" if self.plan is not None else ""
        print(
            f"done: {self.final_dir}; memory used on {self.device}: {_gb(memory['used_bytes'])} (estimate "
            f"{_gb(self.estimate)}{budget}){peak}, peak RSS {_gb(memory['peak_rss_bytes'])}",
            flush=True,
        )

    def close(self) -> None:
        """Close the metrics mirrors (TensorBoard, W&B)."""
        if hasattr(self, "trainer"):
            for mirror in self.trainer.log.mirrors:
                mirror.close()
