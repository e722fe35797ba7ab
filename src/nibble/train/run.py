"""One training run, whatever the task: model (qlora | lora | full) -> trainer -> adapter or model, report, plots.

The task pipelines (:mod:`nibble.train.classify`, :mod:`nibble.train.instruct`) read and check their data,
then hand :func:`run_training` a :class:`TaskRun` with what differs: the datasets, the loss, the evaluation
and the files the export carries. Everything a user can get wrong is checked before the output directory
is touched. The final adapter (``OUT/adapter``, PEFT layout) or model (``OUT/model``, a Hugging Face
checkpoint) is written under a temporary name and renamed, so it only exists once it is complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nibble.data.classify import BatchStream, Dataset, LabelMap
from nibble.errors import NibbleError
from nibble.io.peft import adapter_config, save_adapter
from nibble.io.safetensors import replace_dir
from nibble.io.tokenizer import Tokenizer
from nibble.model.adapter import LABEL_MAP, RUN_INFO
from nibble.model.merge import write_checkpoint
from nibble.nn import QuantLinear, apply_lora
from nibble.nn.lora import resolve_targets
from nibble.train.config import TrainConfig
from nibble.train.metrics import headline, plot_run
from nibble.train.trainer import Trainer, latest_checkpoint

RUN_OUTPUTS = ("adapter", "model", "best", "checkpoints", "plots", "metrics.jsonl", "eval_report.json", "config.yaml")
# The model head each training task puts on the decoder.
MODEL_TASKS = {"classify": "classify", "instruct": "causal_lm"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pad_id_of(tokenizer: Tokenizer, model_dir: Path) -> int:
    """The id batches are padded with: the tokenizer's pad (or eos), else config.json's pad_token_id, else 0."""
    if tokenizer.pad_id is not None:
        return tokenizer.pad_id
    try:
        pad = json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("pad_token_id")
    except (OSError, json.JSONDecodeError):
        pad = None
    return pad if isinstance(pad, int) else 0


def memory_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cache_dequantized(model: nn.Module, budget_mb: int | None, dtype: torch.dtype) -> tuple[int, int, int]:
    """Keep dense copies of frozen 4-bit weights, in model order, while they fit in the budget.

    The weights never change during LoRA training, so a cached copy turns every forward and backward
    through that layer into a plain dense matmul instead of a dequantize + matmul. ``budget_mb=None``
    means half of the memory available now. Returns ``(cached layers, 4-bit layers, cached bytes)``.
    """
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if budget_mb is None:
        available = memory_available_bytes()
        budget = available // 2 if available is not None else 0
    else:
        budget = budget_mb * 2**20
    used = cached = 0
    element = torch.empty(0, dtype=dtype).element_size()
    for layer in layers:
        size = layer.in_features * layer.out_features * element
        if used + size <= budget:
            layer.cache_dequantized = True
            used += size
            cached += 1
        else:
            layer.cache_dequantized = False
            layer.clear_cache()
    return cached, len(layers), used


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


def run_info(config: TrainConfig) -> dict[str, Any]:
    """How the model was trained: what eval/predict/generate/merge need to rebuild it the same way."""
    return {
        "task": config.task,
        "method": config.method,
        "quantize": config.quant_format if config.method == "qlora" else None,
        "double_quant": config.double_quant,
        "blocksize": config.blocksize,
        "group_size": config.group_size,
        "dtype": config.dtype,
        "pooling": config.pooling,
        "max_seq_len": config.max_seq_len,
        "text_column": config.text_column,
        "label_column": config.label_column,
    }


@dataclass
class TaskRun:
    """What a task pipeline hands :func:`run_training`.

    ``loss_fn(outputs, labels)`` scores ``forward(model, batch)`` (default: the model's logits);
    ``evaluate(model)`` returns metrics with ``"loss"``; ``summary`` describes the data on the start
    line; ``label_map`` (classifiers) and ``chat_template`` (a template the tokenizer did not have) are
    saved with every export; ``report`` formats the final evaluation.
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


def export(model: nn.Module, config: TrainConfig, tokenizer: Tokenizer, final: Path, task: TaskRun) -> Path:
    """Write the adapter (LoRA methods) or the whole model (full) to ``final`` via a temporary directory."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
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
    (tmp / RUN_INFO).write_text(json.dumps(run_info(config), indent=2) + "\n", encoding="utf-8")
    tokenizer.save(tmp)
    if task.chat_template is not None:
        (tmp / "chat_template.jinja").write_text(task.chat_template, encoding="utf-8")
    replace_dir(tmp, final)
    return final


def autocast(device: torch.device, dtype_name: str):
    """Autocast to ``dtype_name`` on ``device`` (a no-op context for float32)."""
    if dtype_name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype_name))


def run_training(config: TrainConfig, model_dir: Path, tokenizer: Tokenizer, pad_id: int, task: TaskRun) -> dict:
    """Load the model for ``config.method``, train it on ``task``, export; returns the final evaluation
    (``{}`` without validation data)."""
    from nibble.model import load_model

    out = Path(config.output)
    resume_from = check_output(out, config)
    seed_everything(config.seed)
    quantize = config.quant_format if config.method == "qlora" else None
    base_dtype = torch.float32 if config.method == "full" or config.dtype == "float32" else config.torch_dtype
    model = load_model(
        model_dir,
        task=MODEL_TASKS[config.task],
        num_labels=task.label_map.num_labels if task.label_map else None,
        quantize=quantize,
        double_quant=config.double_quant,
        dtype=base_dtype,
        blocksize=config.blocksize,
        group_size=config.group_size,
        pooling=config.pooling,
    )
    prepare_model(model, config)
    model.gradient_checkpointing = config.gradient_checkpointing
    if quantize is not None:
        cached, total_q, used = cache_dequantized(model, config.cache_budget_mb, config.torch_dtype)
        print(f"cache: {cached}/{total_q} frozen 4-bit projections kept dequantized ({used / 2**20:.1f} MiB)")

    if not config.resume:
        _clear_previous_run(out)
    for leftover in out.glob(".*") if out.is_dir() else ():
        if ".tmp-" in leftover.name or ".old-" in leftover.name:
            shutil.rmtree(leftover, ignore_errors=True)  # an export cut short by a kill
    out.mkdir(parents=True, exist_ok=True)
    config.save(out / "config.yaml")

    stream = BatchStream(task.train, config.batch_size, pad_id, config.seed, config.oversample)
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
    export(model, config, tokenizer, final_dir, task)
    report: dict[str, Any] = {}
    if trainer.last_eval is not None:
        report = {"step": trainer.progress.step, **trainer.last_eval}
        (out / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(task.report(report), flush=True)
    plot_run(trainer.log.records(), report or None, task.label_map.labels if task.label_map else [], out / "plots")
    print(f"done: {final_dir}", flush=True)
    return report
