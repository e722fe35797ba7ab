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
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibble import kernels
from nibble.data.batching import BatchStream, Dataset
from nibble.errors import NibbleError
from nibble.io.files import remove_stale_staging, staged_dir, write_text_atomic
from nibble.io.peft import adapter_config, save_adapter
from nibble.io.runinfo import LABEL_MAP, RUN_INFO, LabelMap, RunInfo
from nibble.io.tokenizer import Tokenizer
from nibble.model.merge import write_checkpoint
from nibble.nn import QuantLinear, apply_lora
from nibble.nn.lora import resolve_targets
from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights
from nibble.train.config import TrainConfig
from nibble.train.metrics import headline, plot_run
from nibble.train.rng import seed_everything
from nibble.train.trainer import Trainer, latest_checkpoint

RUN_OUTPUTS = ("adapter", "model", "best", "checkpoints", "plots", "metrics.jsonl", "eval_report.json", "config.yaml")
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


def check_output(out: Path, config: TrainConfig) -> Path | None:
    """The checkpoint to resume from (or None), after checking that ``out`` may be written."""
    if config.resume:
        if config.resume != "latest":
            path = Path(config.resume)
            if not path.is_dir():
                raise NibbleError(f"--resume {path}: no such checkpoint directory")
            return path
        found = latest_checkpoint(out)
        if found is None:
            print(f"resume: no checkpoint under {out / 'checkpoints'} yet; starting from step 0", flush=True)
        return found
    existing = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if existing and not config.overwrite:
        raise NibbleError(
            f"{out}: already holds a run ({', '.join(existing)}); pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output"
        )
    return None


def _clear_previous_run(out: Path) -> None:
    for name in RUN_OUTPUTS:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


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
    with staged_dir(final, overwrite=True) as tmp:
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
    (``{}`` without validation data)."""
    from nibble.model import load_model

    out = Path(config.output)
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
    device = next(model.parameters()).device
    if kernels.on_fp32_units(config.torch_dtype, device):
        print(
            f"dtype: {config.dtype} on a CPU without native {config.dtype} arithmetic: matmuls and attention take "
            f"{config.dtype} operands and give results in it, multiplied on fp32 units (exact products, fp32 sums)",
            flush=True,
        )
    if quant is not None:
        budget = cache_budget_bytes(config.cache_budget_mb)
        cached, total_q, used = cache_dense_weights(model, budget, config.torch_dtype)
        print(f"cache: {cached}/{total_q} frozen 4-bit projections kept dequantized ({used / 2**20:.1f} MiB)")

    if not config.resume:
        _clear_previous_run(out)
    remove_stale_staging(out)  # an export cut short by a kill
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")

    stream = BatchStream(task.train, config.batch_size, tokenizer.pad_id, config.seed, task.sample_groups)
    steps_per_epoch = math.ceil(stream.batches_per_epoch / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch

    def on_best(step: int) -> None:
        export(model, config, tokenizer, out / "best", task)

    evaluate = task.evaluate if task.val is not None else None
    trainer = Trainer(model, stream, config, out, total_steps, task.loss_fn, evaluate, on_best, task.forward)
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
    best = out / "best"
    if trainer.progress.best_step == trainer.progress.step and best.is_dir():
        # The last evaluation was the best and best/ holds exactly this model: copy it, do not export twice.
        with staged_dir(final_dir, overwrite=True) as tmp:
            shutil.copytree(best, tmp, dirs_exist_ok=True)
    else:
        export(model, config, tokenizer, final_dir, task)
    report: dict[str, Any] = {}
    if trainer.last_eval is not None:
        report = {"step": trainer.progress.step, **trainer.last_eval}
        write_text_atomic(out / "eval_report.json", json.dumps(report, indent=2) + "\n")
        print(task.report(report), flush=True)
    plot_run(trainer.log.records(), report or None, task.label_map.labels if task.label_map else [], out / "plots")
    print(f"done: {final_dir}", flush=True)
    return report
