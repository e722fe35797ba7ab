"""One training run, whatever the task: model (qlora | lora | full) -> trainer -> adapter or model, report, plots.

The task pipelines (:mod:`nibble.train.classify`, :mod:`nibble.train.instruct`) read and check their data,
then hand :func:`run_training` a :class:`TaskRun` with what differs: the datasets, the loss, the evaluation
and the files the export carries. Everything a user can get wrong is checked before the output directory
is touched. The final adapter (``OUT/adapter``, PEFT layout) or model (``OUT/model``, a Hugging Face
checkpoint) is written under a temporary name and renamed, so it only exists once it is complete.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibble import kernels
from nibble.data.batching import BatchStream, Dataset
from nibble.devices import MemoryMeter, describe, device_memory, dtype_name, parse_bytes, resolve_device, resolve_dtype
from nibble.errors import NibbleError
from nibble.io.files import read_json_object, remove_stale_staging, staged_dir, write_text_atomic
from nibble.io.gguf import gguf_source, native_model
from nibble.io.lock import locked_directory
from nibble.io.peft import adapter_config, save_adapter
from nibble.io.runinfo import LABEL_MAP, RUN_INFO, LabelMap, RunInfo
from nibble.io.tokenizer import Tokenizer
from nibble.model.config import ModelConfig
from nibble.model.memory import (
    METHODS_BY_PREFERENCE,
    PlanOptions,
    RunPlan,
    choose_plan,
    estimate_bytes,
    plan_candidates,
    projection_shapes,
)
from nibble.model.merge import write_checkpoint
from nibble.model.model import fused_elementwise
from nibble.model.moe import RouterLoss, sparse_blocks
from nibble.nn import apply_lora
from nibble.nn.lora import lora_layers, resolve_targets, trainable_parts
from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights
from nibble.train import distributed
from nibble.train.checkpoint import (
    discard_checkpoints_after,
    list_checkpoints,
    newest_intact_checkpoint,
    read_state,
    verify_checkpoint,
)
from nibble.train.config import TrainConfig, read_yaml
from nibble.train.metrics import MetricsLog, headline, plot_run
from nibble.train.optim import WarmupCosine
from nibble.train.report import open_reporters, report_targets
from nibble.train.rng import seed_everything
from nibble.train.trainer import Progress, Trainer, read_progress

RUN_OUTPUTS = (
    "adapter",
    "model",
    "best",
    "checkpoints",
    "plots",
    "metrics.jsonl",
    "eval_report.json",
    "config.yaml",
    "tensorboard",
    "wandb",
)
# Where --overwrite keeps the previous run until the new one has written a checkpoint; ".replacing" while
# the previous run's outputs are being moved there.
REPLACED, REPLACING = ".replaced", ".replacing"
# The model head each training task puts on the decoder.
MODEL_TASKS = {"classify": "classify", "instruct": "causal_lm"}


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


def check_lora_rank(config: TrainConfig, model_config: ModelConfig) -> None:
    """A LoRA rank above min(in, out) of a target adds nothing (the update's rank cannot exceed it) and can
    exhaust memory: refuse it before the model is loaded, naming the target and the limit."""
    if config.method == "full":
        return
    shapes = projection_shapes(model_config)
    for target in resolve_targets(config.lora_targets):
        shape = shapes.get(target.rsplit(".", 1)[-1])
        if shape is not None and config.lora_rank > min(shape):
            raise NibbleError(
                f"'lora_rank' {config.lora_rank} is larger than {target} allows ({shape[1]} -> {shape[0]} "
                f"features, so at most {min(shape)}); use --lora-rank {min(shape)} or less"
            )


def check_output(out: Path, config: TrainConfig) -> Path | None:
    """The checkpoint to resume from (or None), after checking that ``out`` may be written. ``--resume``
    takes the newest checkpoint whose files match its manifest, naming each newer one it skips."""
    if config.resume:
        if config.resume != "latest":
            path = Path(config.resume)
            if not path.is_dir():
                raise NibbleError(f"--resume {path}: no such checkpoint directory")
            verify_checkpoint(path)  # before anything, even a finished run's "nothing to do", relies on it
            return path
        found, skipped = newest_intact_checkpoint(out / "checkpoints")
        for path, reason in skipped:
            print(f"resume: skipping {path}: {reason}", flush=True)
        if found is None:
            print(f"resume: no intact checkpoint under {out / 'checkpoints'}; starting from step 0", flush=True)
        return found
    existing = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if existing and not config.overwrite:
        raise NibbleError(
            f"{out}: already holds a run ({', '.join(existing)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output"
        )
    return None


def _remove_outputs(out: Path) -> None:
    for name in RUN_OUTPUTS:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


def _set_previous_run_aside(out: Path) -> None:
    """``--overwrite``: move the previous run's outputs into ``OUT/.replaced``, where they stay until the new
    run has written its first checkpoint (see :func:`settle_replaced_run`)."""
    existing = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if not existing:
        return
    moving = out / REPLACING
    moving.mkdir()
    for name in existing:
        os.rename(out / name, moving / name)
    os.rename(moving, out / REPLACED)


def _move_back(aside: Path, out: Path) -> None:
    for item in aside.iterdir():
        os.rename(item, out / item.name)
    aside.rmdir()


def settle_replaced_run(out: Path) -> None:
    """Finish or undo what ``--overwrite`` set aside in ``out``: once the new run has a checkpoint the previous
    run is deleted; a new run that stopped before that (failed, interrupted, killed) gives it back."""
    if (out / REPLACING).is_dir():  # stopped while moving: only the previous run's outputs exist
        _move_back(out / REPLACING, out)
        print(f"{out}: restored the previous run (a --overwrite run stopped before writing anything)", flush=True)
    aside = out / REPLACED
    if not aside.is_dir():
        return
    if list_checkpoints(out / "checkpoints"):
        shutil.rmtree(aside)
        return
    _remove_outputs(out)
    _move_back(aside, out)
    print(f"{out}: restored the previous run (the --overwrite run stopped before its first checkpoint)", flush=True)


def run_info(config: TrainConfig, step: int | None = None) -> RunInfo:
    """How the model was trained: what eval/predict/generate/merge need to rebuild it the same way, the model
    the run started from, and the optimizer step the weights come from."""
    quant = config.quant_spec if config.method == "qlora" else None
    gguf_base = None
    if quant is not None and quant.format == "gguf":
        source = gguf_source(config.model)
        gguf_base = {"file": source.name, "bytes": source.stat().st_size}
    return RunInfo(
        task=config.task,
        method=config.method,
        quant=quant,
        gguf_base=gguf_base,
        dtype=config.dtype,
        pooling=config.pooling,
        max_seq_len=config.max_seq_len,
        text_column=config.text_column,
        label_column=config.label_column,
        columns=config.columns,
        base_model=str(Path(config.model).resolve()) if config.model else None,
        step=step,
    )


@dataclass
class TaskRun:
    """What a task pipeline hands :func:`run_training`.

    ``loss_fn(outputs, labels)`` scores ``forward(model, batch)`` (default: the model's logits);
    ``evaluate(model, batch_size)`` returns metrics with ``"loss"`` (the batch size is the run's, decided once the
    micro-batch is: ``eval_batch_size`` or twice the micro-batch); ``summary`` describes the data on the start
    line; ``label_map`` (classifiers) and ``chat_template`` (a template the tokenizer did not have) are
    saved with every export; ``report`` formats the final evaluation; ``sample_groups`` (one group per
    training example) makes the batch stream repeat minority groups up to the largest; ``loss_units(batch)`` is
    what ``loss_fn`` averages over (default: the rows), to weigh the ranks of a torchrun run.
    """

    train: Dataset
    val: Dataset | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[nn.Module, int], dict[str, Any]] | None
    summary: str
    forward: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None
    label_map: LabelMap | None = None
    chat_template: str | None = None
    report: Callable[[dict[str, Any]], str] = headline
    sample_groups: Sequence[int] | None = None
    loss_units: Callable[[dict[str, torch.Tensor]], float] | None = None


def export(
    model: nn.Module, config: TrainConfig, tokenizer: Tokenizer, final: Path, task: TaskRun, model_dir: Path, step: int
) -> Path:
    """Write the adapter (LoRA methods) or the whole model (full) at ``step`` to ``final``, which appears only
    when complete. The adapter names ``model_dir`` (the HF directory the base was loaded from: the one given,
    or a .gguf file's conversion) as its base, so PEFT's ``AutoPeftModel*`` can load it; nibble.json keeps the
    model as the user named it."""
    exported = model.parameters() if config.method == "full" else (p for p in model.parameters() if p.requires_grad)
    needed = sum(p.numel() * 4 for p in exported)  # written in fp32
    with staged_dir(final, overwrite=True, needed=needed) as tmp:
        if config.method == "full":
            write_checkpoint(model, tmp, torch.float32, labels=task.label_map.labels if task.label_map else None)
        else:
            peft_config = adapter_config(
                base_model=str(model_dir.resolve()),
                targets=sorted({path.rsplit(".", 1)[-1] for path in lora_layers(model)}),  # what all-linear found
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                task=MODEL_TASKS[config.task],
            )
            save_adapter(model, tmp, peft_config)
        if task.label_map is not None:
            task.label_map.save(tmp / LABEL_MAP)
        run_info(config, step).save(tmp / RUN_INFO)
        tokenizer.save(tmp)
        if task.chat_template is not None:
            (tmp / "chat_template.jinja").write_text(task.chat_template, encoding="utf-8")
    return final


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


def _finished_already(out: Path, final: Path, checkpoint: Path, total_steps: int, config: TrainConfig) -> bool:
    """Whether resuming from ``checkpoint`` has nothing to do: the run there is finished for ``total_steps``
    and its export is from that step. Prints what resuming will do."""
    progress, schedule_steps = read_progress(checkpoint)
    lifted = progress.apply_patience(config.early_stopping_patience)
    if progress.finished(total_steps):
        exported = RunInfo.load(final / RUN_INFO).step if (final / RUN_INFO).is_file() else None
        if exported != progress.step:
            print(f"resume: {checkpoint} ends the run; exporting it", flush=True)
            return False
        if progress.stopped_early:
            print(
                f"{out}: the run stopped early at step {progress.step} (val loss not lower for "
                f"{progress.evals_without_improvement} evaluations; best at step {progress.best_step}); nothing to "
                "do. A larger --early-stopping-patience (or 0) with --resume trains on",
                flush=True,
            )
        else:
            print(
                f"{out}: the run is finished at step {progress.step} of {total_steps}; nothing to do. "
                "A larger --max-steps with --resume trains on",
                flush=True,
            )
        return True
    if lifted:
        print(
            f"resume: the early stop at step {progress.step} no longer holds with --early-stopping-patience "
            f"{config.early_stopping_patience}; training on",
            flush=True,
        )
    if schedule_steps is not None and schedule_steps != total_steps:
        schedule = WarmupCosine(total_steps, config.warmup_ratio, config.min_lr_ratio)
        print(
            f"resume: extending the run from {schedule_steps} to {total_steps} steps; the warmup+cosine schedule "
            f"is recomputed for {total_steps} steps, so step {progress.step + 1} trains at lr "
            f"{config.lr * schedule.factor(progress.step):.3g}",
            flush=True,
        )
    return False


def plan_options(config: TrainConfig, num_labels: int | None, device: torch.device) -> PlanOptions:
    """The memory planner's view of a config whose dtype is resolved (``method`` auto is planned as qlora); a
    ``gguf`` base is sized by the blocks its file stores."""
    gguf_bytes = native_model(config.model).projection_bytes() if config.quant_spec.format == "gguf" else None
    return PlanOptions(
        method="qlora" if config.method == "auto" else config.method,
        quant=config.quant_spec,
        task=MODEL_TASKS[config.task],
        num_labels=num_labels or 2,
        seq_len=config.max_seq_len,
        batch_size=config.batch_size,
        lora_rank=config.lora_rank,
        lora_targets=resolve_targets(config.lora_targets),
        train_router=config.train_router,
        lora_dropout=config.lora_dropout,
        dtype=config.dtype,
        checkpointing=config.gradient_checkpointing,
        train_embeddings=config.train_embeddings,
        device=device.type,
        cache_budget=None if config.cache_budget_mb is None else config.cache_budget_mb * 2**20,
        gguf_projection_bytes=gguf_bytes,
    )


# The share of a device's free memory a run plans to fill when no --memory-budget is given: the rest absorbs
# what the estimate leaves out (allocator fragmentation, library workspaces).
FREE_MEMORY_SHARE = 0.9


def memory_budget(config: TrainConfig, device: torch.device) -> tuple[int, str]:
    """The bytes a run may use and where that number comes from: ``memory_budget``, else a share of the device's
    free memory.

    Raises:
        NibbleError: no budget given and the device's free memory is unknown.
    """
    if config.memory_budget is not None:
        return parse_bytes(config.memory_budget, "memory_budget"), f"--memory-budget {config.memory_budget}"
    free, _ = device_memory(device)
    if free is None:
        raise NibbleError(f"the free memory of {device} is unknown; pass --memory-budget (e.g. 12GB)")
    return int(free * FREE_MEMORY_SHARE), f"{FREE_MEMORY_SHARE:.0%} of the free memory of {device}"


def plan_space(config: TrainConfig) -> tuple[int, tuple[str, ...], tuple[bool, ...]]:
    """What a planned run chooses among: ``(batch, methods, checkpointing settings)``. The batch (micro-batch x
    accumulation steps) is the one the config asks for; every method for ``auto``; checkpointing only if the
    config does not already ask for it."""
    methods = METHODS_BY_PREFERENCE if config.method == "auto" else (config.method,)
    checkpointing = (True,) if config.gradient_checkpointing else (False, True)
    return config.batch_size * config.grad_accum, methods, checkpointing


def fit_to_memory(
    config: TrainConfig, model: ModelConfig, num_labels: int | None, device: torch.device
) -> tuple[TrainConfig, RunPlan | None, str]:
    """With ``method`` auto or a ``memory_budget``: the config with method, micro-batch, accumulation steps and
    gradient checkpointing chosen to fit (see :func:`nibble.model.memory.choose_plan`; the requested batch size
    times accumulation steps is kept), the plan and where its budget comes from. Otherwise the config unchanged.

    Resuming a planned run takes the choices from its ``config.yaml`` (the free memory may differ now, and the
    data position in a checkpoint only fits the same micro-batch).
    """
    if config.method != "auto" and config.memory_budget is None:
        return config, None, ""
    budget, source = memory_budget(config, device)
    saved = Path(config.output or ".") / "config.yaml"
    if config.resume and config.output and saved.is_file():
        previous = read_yaml(saved)
        keys = ("method", "batch_size", "grad_accum", "gradient_checkpointing")
        config = replace(config, **{k: previous[k] for k in keys if k in previous})
        opts = plan_options(config, num_labels, device)
        plan = RunPlan(
            config.method,
            config.batch_size,
            config.grad_accum,
            config.gradient_checkpointing,
            estimate_bytes(model, opts, cache_limit=0),
            budget,
        )
        return config, plan, f"{source}; the choices of {saved}"
    candidates = plan_candidates(model, plan_options(config, num_labels, device), budget, *plan_space(config))
    plan = choose_plan(candidates, budget)
    planned = dict(method=plan.method, batch_size=plan.batch_size, grad_accum=plan.grad_accum)
    return replace(config, gradient_checkpointing=plan.checkpointing, **planned), plan, source


def _gb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e9:.3f} GB"


def run_training(config: TrainConfig, model_dir: Path, tokenizer: Tokenizer, task: TaskRun) -> TrainResult:
    """Load the model for ``config.method`` on ``config.device``, train it on ``task``, export.

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
        check_lora_rank(config, ModelConfig.from_hf(model_dir))
        with locked_directory(out) if part.is_main else nullcontext():
            with distributed.main_first() as main:
                if main:
                    settle_replaced_run(out)
            try:
                result = _train_locked(config, model_dir, tokenizer, task, out, device, part)
            except BaseException:
                if part.is_main:
                    settle_replaced_run(out)
                raise
        distributed.barrier()  # no rank leaves the group while another still works in it
        return result
    finally:
        distributed.stop()


def global_micro_batch(config: TrainConfig, resume_from: Path | None, part: distributed.Parallel) -> TrainConfig:
    """The config with the per-rank ``batch_size`` a resumed run needs to keep the global micro-batch (per-rank
    batch x ranks) its checkpoint was trained with, whatever the number of ranks now (an elastic resume).

    Raises:
        NibbleError: the checkpoint's global micro-batch does not split evenly over this many ranks.
    """
    if resume_from is None:
        return config
    saved = read_state(resume_from).get("data", {}).get("batch_size")
    if not isinstance(saved, int) or saved == config.batch_size * part.world:
        return config
    if saved % part.world:
        raise NibbleError(
            f"{resume_from}: trained with {saved} rows per global micro-batch, which {part.world} ranks cannot "
            f"share evenly; resume on a number of ranks that divides {saved}, with --batch-size {saved} // ranks"
        )
    print(
        f"resume: {resume_from} was trained with {saved} rows per global micro-batch; each of the {part.world} "
        f"ranks now takes --batch-size {saved // part.world}",
        flush=True,
    )
    return replace(config, batch_size=saved // part.world)


def _train_locked(
    config: TrainConfig,
    model_dir: Path,
    tokenizer: Tokenizer,
    task: TaskRun,
    out: Path,
    device: torch.device,
    part: distributed.Parallel,
) -> TrainResult:
    from nibble.model import load_model

    resume_from = check_output(out, config)
    asked = config.dtype
    config = replace(config, dtype=dtype_name(resolve_dtype(config.dtype, device)))
    print(describe(device, config.torch_dtype, asked), flush=True)
    num_labels = task.label_map.num_labels if task.label_map else None
    model_config = ModelConfig.from_hf(model_dir)
    config, plan, source = fit_to_memory(config, model_config, num_labels, device)
    if plan is not None:
        print(f"plan: {plan.describe()} ({source})", flush=True)
    config = global_micro_batch(config, resume_from, part)
    stream = BatchStream(
        task.train,
        config.batch_size * part.world,
        tokenizer.pad_id,
        config.seed,
        task.sample_groups,
        part=(part.rank, part.world),
    )
    total_steps = config.max_steps or config.epochs * math.ceil(stream.batches_per_epoch / config.grad_accum)
    final_dir = out / ("model" if config.method == "full" else "adapter")
    if resume_from is not None and _finished_already(out, final_dir, resume_from, total_steps, config):
        return _result(out, final_dir, read_progress(resume_from)[0], resume_from)

    seed_everything(config.seed)
    # The first optimizer imports torch._dynamo: about 150 MB of code in the RSS (measured on CPU), the same for
    # every model. Imported before the meter starts, it stays out of the memory the run is measured to use.
    import torch._dynamo  # noqa: F401

    meter = MemoryMeter(device)
    quant = config.quant_spec if config.method == "qlora" else None
    dtype = config.torch_dtype
    base_dtype = torch.float32 if config.method == "full" else dtype
    lora_method = config.method != "full"  # exports of a sharded model gather the adapter alone, not the base
    # FSDP2 for full fine-tuning and a sharded base; else the LoRA methods replicate the model (DDP, in the Trainer)
    sharded = part.active and (not lora_method or config.shard_base)
    model = load_model(
        model_dir,
        task=MODEL_TASKS[config.task],
        num_labels=num_labels,
        quantize=quant,
        dtype=base_dtype,
        # a base sharded because it may not fit the device is loaded on the host; sharding moves it a block at a time
        device=torch.device("cpu") if sharded and lora_method else device,
        pooling=config.pooling,
    )
    prepare_model(model, config)
    n_all = sum(p.numel() for p in model.parameters()) + sum(  # 4-bit projections and experts
        m.qweight.numel for m in model.modules() if getattr(m, "qweight", None) is not None
    )
    if sharded:
        distributed.shard_model(model, device)
    if part.rank:  # its own dropout masks (DDP gives every rank rank 0's initial trainable weights)
        torch.manual_seed(config.seed + part.rank)
    model.gradient_checkpointing = config.gradient_checkpointing
    if config.compile:
        fuse_elementwise(model, device)
    cache_budget = 0
    if kernels.on_fp32_units(config.torch_dtype, device):
        print(
            f"dtype: {config.dtype} on a CPU without native {config.dtype} arithmetic: matmuls and attention take "
            f"{config.dtype} operands and give results in it, multiplied on fp32 units (exact products, fp32 sums)",
            flush=True,
        )
    if quant is not None and sharded:
        print(f"cache: none (the frozen 4-bit base is sharded over {part.world} ranks)", flush=True)
    elif quant is not None:
        cache_budget = cache_budget_bytes(model, dtype, config.cache_budget_mb)
        if plan is not None:  # the copies fill at most what the planned run leaves of the budget
            cache_budget = max(min(cache_budget, plan.budget_bytes - plan.estimate_bytes), 0)
        cached, total_q, used = cache_dense_weights(model, cache_budget, dtype)
        print(f"cache: {cached}/{total_q} frozen 4-bit projections kept dequantized ({used / 2**20:.1f} MiB)")
    opts = replace(
        plan_options(config, num_labels, device),
        cache_budget=cache_budget,
        batch_tokens=stream.most_tokens(total_steps * config.grad_accum),  # the run's own batches
    )
    estimate = estimate_bytes(model_config, opts)

    with distributed.main_first() as main:
        if main:
            if not config.resume:
                _set_previous_run_aside(out)
            elif resume_from is None:  # nothing (intact) to resume: what a killed run left before its 1st checkpoint
                (out / "metrics.jsonl").unlink(missing_ok=True)
                discard_checkpoints_after(out / "checkpoints", -1)
            remove_stale_staging(out)  # an export cut short by a kill
            out.mkdir(parents=True, exist_ok=True)
            config.save(out / "config.yaml")

    def on_best(step: int) -> None:
        with distributed.gathered(model, trainable_only=lora_method):
            if part.is_main:
                export(model, config, tokenizer, out / "best", task, model_dir, step)

    evaluate = None
    if task.evaluate is not None and task.val is not None:
        eval_batch = config.eval_batch_size or 2 * config.batch_size

        def evaluate(m: nn.Module) -> dict[str, Any]:
            return task.evaluate(m, eval_batch)

    def on_save(path: Path) -> None:
        if part.is_main:
            shutil.rmtree(out / REPLACED, ignore_errors=True)  # what --overwrite set aside is no longer needed

    router_weight, loss_fn, window_metrics = 0.0, task.loss_fn, None
    if model.config.moe is not None:  # the load-balancing loss is logged, and added when it has a weight
        router_weight = config.router_aux_weight(model.config.moe.router_aux_loss_coef)
        router_loss = RouterLoss(model, task.loss_fn, router_weight)
        loss_fn, window_metrics = router_loss, router_loss.window_metrics
    trainer = Trainer(
        model,
        stream,
        config,
        out,
        total_steps,
        loss_fn,
        evaluate,
        on_best,
        task.forward,
        meter,
        on_save,
        task.loss_units,
        window_metrics,
    )
    if resume_from is not None:
        trainer.resume(resume_from)
        print(f"resumed from {resume_from} at step {trainer.progress.step}", flush=True)
    if part.is_main:
        reporters = open_reporters(report_targets(config.report_to), out, config.to_dict(), trainer.progress.step)
        trainer.log.mirrors = reporters
    n_train = sum(p.numel() for _, p in trainer.named_params)
    print(
        f"train: {task.summary}; {config.method}, {n_train:,} of {n_all:,} weights trainable; {total_steps} steps",
        flush=True,
    )
    if model.config.moe is not None:
        parts = ", ".join(f"{part} {n:,}" for part, n in trainable_parts(model).items())
        print(f"trainable by part: {parts}; router aux loss weight {router_weight:g}", flush=True)
    try:
        progress = trainer.train()
    finally:
        for mirror in trainer.log.mirrors:
            mirror.close()
    memory = {
        "device": str(device),
        **meter.read(),
        "estimate_bytes": estimate,
        "budget_bytes": plan.budget_bytes if plan is not None else None,
    }

    best = out / "best"
    # (decided by rank 0, which wrote best/: the export of a sharded model needs every rank)
    from_best = distributed.broadcast_text("best" if progress.best_step == progress.step and best.is_dir() else "")
    if from_best:
        # The last evaluation was the best and best/ holds exactly this model: copy it, do not export twice.
        if part.is_main:
            with staged_dir(final_dir, overwrite=True) as tmp:
                shutil.copytree(best, tmp, dirs_exist_ok=True)
    else:
        # a sharded model's consolidated export (of a LoRA method: the adapter alone, the base stays sharded)
        with distributed.gathered(model, trainable_only=lora_method):
            if part.is_main:
                export(model, config, tokenizer, final_dir, task, model_dir, progress.step)
    if not part.is_main:
        return TrainResult(out, final_dir, None, trainer.last_checkpoint, {}, progress.step, progress.stopped_early)
    report: dict[str, Any] = {}
    if trainer.last_eval is not None:
        report = {"step": progress.step, **trainer.last_eval, "memory": memory}
        write_text_atomic(out / "eval_report.json", json.dumps(report, indent=2) + "\n")
        print(task.report(report), flush=True)
    labels = task.label_map.labels if task.label_map else []
    with staged_dir(out / "plots", overwrite=True) as plots:
        plot_run(trainer.log.records(), report or None, labels, plots, name=out.resolve().name)
    device_peak = "" if memory["peak_device_bytes"] is None else f", device peak {_gb(memory['peak_device_bytes'])}"
    print(
        f"done: {final_dir}; memory used on {device}: {_gb(memory['used_bytes'])} (estimate {_gb(estimate)}"
        f"{', budget ' + _gb(plan.budget_bytes) if plan is not None else ''}){device_peak}, "
        f"peak RSS {_gb(memory['peak_rss_bytes'])}",
        flush=True,
    )
    return _result(out, final_dir, progress, trainer.last_checkpoint)
