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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibble.data.batching import BatchStream, Dataset
from nibble.errors import NibbleError
from nibble.io.files import remove_stale_staging, staged_dir, write_text_atomic
from nibble.io.lock import locked_directory
from nibble.io.peft import adapter_config, save_adapter
from nibble.io.runinfo import LABEL_MAP, RUN_INFO, LabelMap, RunInfo
from nibble.io.tokenizer import Tokenizer
from nibble.model.config import ModelConfig
from nibble.model.memory import projection_shapes
from nibble.model.merge import write_checkpoint
from nibble.nn import QuantLinear, apply_lora
from nibble.nn.lora import resolve_targets
from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights
from nibble.train.checkpoint import discard_checkpoints_after, list_checkpoints, newest_intact_checkpoint
from nibble.train.config import TrainConfig
from nibble.train.metrics import headline, plot_run
from nibble.train.rng import seed_everything
from nibble.train.trainer import Trainer

RUN_OUTPUTS = ("adapter", "model", "best", "checkpoints", "plots", "metrics.jsonl", "eval_report.json", "config.yaml")
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
    if hasattr(model, "score"):
        # Trainable weights stay fp32 (master weights); autocast runs the matmuls in the compute dtype.
        model.score.float()
        model.score.weight.requires_grad_(True)
    return wrapped


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


def run_info(config: TrainConfig) -> RunInfo:
    """How the model was trained: what eval/predict/generate/merge need to rebuild it the same way."""
    return RunInfo(
        task=config.task,
        method=config.method,
        quant=config.quant_spec if config.method == "qlora" else None,
        dtype=config.dtype,
        pooling=config.pooling,
        max_seq_len=config.max_seq_len,
        text_column=config.text_column,
        label_column=config.label_column,
    )


@dataclass
class TaskRun:
    """What a task pipeline hands :func:`run_training`.

    ``loss_fn(outputs, labels)`` scores ``forward(model, batch)`` (default: the model's logits);
    ``evaluate(model)`` returns metrics with ``"loss"``; ``summary`` describes the data on the start
    line; ``label_map`` (classifiers) and ``chat_template`` (a template the tokenizer did not have) are
    saved with every export; ``report`` formats the final evaluation; ``sample_groups`` (one group per
    training example) makes the batch stream repeat minority groups up to the largest.
    """

    train: Dataset
    val: Dataset | None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, Any]] | None
    summary: str
    forward: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor] | None = None
    label_map: LabelMap | None = None
    chat_template: str | None = None
    report: Callable[[dict[str, Any]], str] = headline
    sample_groups: Sequence[int] | None = None


def export(model: nn.Module, config: TrainConfig, tokenizer: Tokenizer, final: Path, task: TaskRun) -> Path:
    """Write the adapter (LoRA methods) or the whole model (full) to ``final``, which appears only when complete."""
    exported = model.parameters() if config.method == "full" else (p for p in model.parameters() if p.requires_grad)
    needed = sum(p.numel() * 4 for p in exported)  # written in fp32
    with staged_dir(final, overwrite=True, needed=needed) as tmp:
        if config.method == "full":
            write_checkpoint(model, tmp, torch.float32, labels=task.label_map.labels if task.label_map else None)
        else:
            peft_config = adapter_config(
                base_model=config.model,
                targets=list(resolve_targets(config.lora_targets)),
                rank=config.lora_rank,
                alpha=config.lora_alpha,
                dropout=config.lora_dropout,
                use_rslora=config.use_rslora,
                task=MODEL_TASKS[config.task],
            )
            save_adapter(model, tmp, peft_config)
        if task.label_map is not None:
            task.label_map.save(tmp / LABEL_MAP)
        run_info(config).save(tmp / RUN_INFO)
        tokenizer.save(tmp)
        if task.chat_template is not None:
            (tmp / "chat_template.jinja").write_text(task.chat_template, encoding="utf-8")
    return final


def run_training(config: TrainConfig, model_dir: Path, tokenizer: Tokenizer, task: TaskRun) -> dict:
    """Load the model for ``config.method``, train it on ``task``, export; returns the final evaluation
    (``{}`` without validation data).

    The run holds an exclusive lock on its output directory from before it reads anything there until it
    ends (see :func:`nibble.io.lock.locked_directory`): a second run on the same output is refused.

    Raises:
        NibbleError: a bad option or input, or a directory in use (naming the pid holding it).
        Interrupted: SIGINT/SIGTERM stopped the run (after a checkpoint; see :meth:`Trainer.train`).
    """
    out = Path(config.output)
    check_lora_rank(config, ModelConfig.from_hf(model_dir))
    with locked_directory(out):
        settle_replaced_run(out)
        try:
            return _train_locked(config, model_dir, tokenizer, task, out)
        except BaseException:
            settle_replaced_run(out)
            raise


def _train_locked(config: TrainConfig, model_dir: Path, tokenizer: Tokenizer, task: TaskRun, out: Path) -> dict:
    from nibble.model import load_model

    resume_from = check_output(out, config)
    seed_everything(config.seed)
    quant = config.quant_spec if config.method == "qlora" else None
    base_dtype = torch.float32 if config.method == "full" or config.dtype == "float32" else config.torch_dtype
    model = load_model(
        model_dir,
        task=MODEL_TASKS[config.task],
        num_labels=task.label_map.num_labels if task.label_map else None,
        quantize=quant,
        dtype=base_dtype,
        pooling=config.pooling,
    )
    prepare_model(model, config)
    model.gradient_checkpointing = config.gradient_checkpointing
    if quant is not None:
        budget = cache_budget_bytes(config.cache_budget_mb)
        cached, total_q, used = cache_dense_weights(model, budget, config.torch_dtype)
        print(f"cache: {cached}/{total_q} frozen 4-bit projections kept dequantized ({used / 2**20:.1f} MiB)")

    if not config.resume:
        _set_previous_run_aside(out)
    elif resume_from is None:  # nothing (intact) to resume: what a killed run left before its first checkpoint goes
        (out / "metrics.jsonl").unlink(missing_ok=True)
        discard_checkpoints_after(out / "checkpoints", -1)
    remove_stale_staging(out)  # an export cut short by a kill
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")

    stream = BatchStream(task.train, config.batch_size, tokenizer.pad_id, config.seed, task.sample_groups)
    steps_per_epoch = math.ceil(stream.batches_per_epoch / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    def on_best(step: int) -> None:
        export(model, config, tokenizer, out / "best", task)

    evaluate = task.evaluate if task.val is not None else None

    def on_save(path: Path) -> None:
        shutil.rmtree(out / REPLACED, ignore_errors=True)  # what --overwrite set aside is no longer needed

    trainer = Trainer(
        model, stream, config, out, total_steps, task.loss_fn, evaluate, on_best, task.forward, on_save=on_save
    )
    if resume_from is not None:
        trainer.resume(resume_from)
        print(f"resumed from {resume_from} at step {trainer.progress.step}", flush=True)
    n_train = sum(p.numel() for _, p in trainer.named_params)
    n_all = sum(p.numel() for p in model.parameters()) + sum(
        m.qweight.numel for m in model.modules() if isinstance(m, QuantLinear)
    )
    print(
        f"train: {task.summary}; {config.method}, {n_train:,} of {n_all:,} weights trainable; {total_steps} steps",
        flush=True,
    )
    trainer.train()

    final_dir = out / ("model" if config.method == "full" else "adapter")
    export(model, config, tokenizer, final_dir, task)
    report: dict[str, Any] = {}
    if trainer.last_eval is not None:
        report = {"step": trainer.progress.step, **trainer.last_eval}
        write_text_atomic(out / "eval_report.json", json.dumps(report, indent=2) + "\n")
        print(task.report(report), flush=True)
    with staged_dir(out / "plots", overwrite=True) as plots:
        plot_run(trainer.log.records(), report or None, task.label_map.labels if task.label_map else [], plots)
    print(f"done: {final_dir}", flush=True)
    return report
