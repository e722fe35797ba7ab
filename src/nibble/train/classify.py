"""The sequence-classification pipeline: data -> model (qlora | lora | full) -> train -> adapter or model.

Everything a user can get wrong (paths, data rows, labels, config values, an existing output) is
checked before the output directory is touched. The final adapter (``OUT/adapter``, PEFT layout) or
model (``OUT/model``, a Hugging Face checkpoint) is written under a temporary name and renamed, so it
only exists once it is complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nibble.data.classify import (
    BatchStream,
    ClassificationData,
    LabelMap,
    class_weights,
    iter_batches,
    load_classification,
    stratified_split,
)
from nibble.errors import NibbleError
from nibble.io.peft import adapter_config, save_adapter
from nibble.io.safetensors import save_file_atomic
from nibble.io.tokenizer import Tokenizer, load_tokenizer
from nibble.nn import QuantLinear, apply_lora
from nibble.nn.lora import resolve_targets
from nibble.train.config import TrainConfig
from nibble.train.metrics import classification_loss, classification_metrics, format_metrics, plot_run
from nibble.train.trainer import Trainer, latest_checkpoint

LABEL_MAP = "label_map.json"
RUN_INFO = "nibble.json"
RUN_OUTPUTS = ("adapter", "model", "best", "checkpoints", "plots", "metrics.jsonl", "eval_report.json", "config.yaml")


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
    # Trainable weights stay fp32 (master weights); autocast runs the matmuls in the compute dtype.
    model.score.float()
    model.score.weight.requires_grad_(True)
    return wrapped


def _check_output(out: Path, config: TrainConfig) -> Path | None:
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


def _publish(tmp: Path, final: Path) -> None:
    """Move a finished temporary directory into place, replacing an older one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def run_info(config: TrainConfig) -> dict[str, Any]:
    """How the model was trained: what eval/predict need to rebuild it the same way."""
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


def export(model: nn.Module, config: TrainConfig, label_map: LabelMap, tokenizer: Tokenizer, final: Path) -> Path:
    """Write the adapter (LoRA methods) or the whole model (full) to ``final`` via a temporary directory."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if config.method == "full":
        hf = replace(
            model.config, num_labels=label_map.num_labels, id2label=dict(enumerate(map(str, label_map.labels)))
        )
        (tmp / "config.json").write_text(json.dumps(hf.to_hf(), indent=2) + "\n", encoding="utf-8")
        save_file_atomic(dict(model.named_parameters()), tmp / "model.safetensors", metadata={"format": "pt"})
    else:
        targets = list(resolve_targets(config.lora_targets))
        peft_config = adapter_config(
            base_model=config.model,
            targets=targets,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            use_rslora=config.use_rslora,
            task=config.task,
        )
        save_adapter(model, tmp, peft_config)
    label_map.save(tmp / LABEL_MAP)
    (tmp / RUN_INFO).write_text(json.dumps(run_info(config), indent=2) + "\n", encoding="utf-8")
    tokenizer.save(tmp)
    _publish(tmp, final)
    return final


def autocast(device: torch.device, dtype_name: str):
    """Autocast to ``dtype_name`` on ``device`` (a no-op context for float32)."""
    if dtype_name == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype_name))


def predict_probs(model: nn.Module, data: ClassificationData, batch_size: int, pad_id: int) -> torch.Tensor:
    """Class probabilities [N, K] in row order (softmax, or sigmoid for multi-label)."""
    out = []
    with torch.no_grad():
        for _, batch in iter_batches(data, batch_size, pad_id):
            logits = model(batch["input_ids"], batch["attention_mask"]).float()
            out.append(logits.sigmoid() if data.label_map.multi_label else logits.softmax(-1))
    return torch.cat(out)


def evaluate(
    model: nn.Module, data: ClassificationData, batch_size: int, pad_id: int, weights: torch.Tensor | None = None
) -> dict[str, Any]:
    """Metrics of ``model`` on labelled ``data`` (see :func:`classification_metrics`)."""
    lm = data.label_map
    total = 0.0
    probs, labels = [], []
    with torch.no_grad():
        for chunk, batch in iter_batches(data, batch_size, pad_id):
            logits = model(batch["input_ids"], batch["attention_mask"]).float()
            total += float(classification_loss(logits, batch["labels"], lm.multi_label, weights)) * len(chunk)
            probs.append(logits.sigmoid() if lm.multi_label else logits.softmax(-1))
            labels.append(batch["labels"])
    return classification_metrics(torch.cat(probs), torch.cat(labels), lm, total / len(data))


def train_classifier(config: TrainConfig) -> dict[str, Any]:
    """Run ``nibble train --task classify``; returns the final evaluation (or {} without validation data)."""
    from nibble.model import load_model

    out = Path(config.output)
    model_dir = Path(config.model)
    if not (model_dir / "config.json").is_file():
        raise NibbleError(f"{model_dir}: not a model directory (no config.json); check --model")
    tokenizer = load_tokenizer(model_dir)
    pad_id = pad_id_of(tokenizer, model_dir)
    kwargs = dict(text_column=config.text_column, label_column=config.label_column, max_seq_len=config.max_seq_len)
    data = load_classification(config.data, tokenizer, **kwargs)
    val: ClassificationData | None = None
    if config.val_data:
        val = load_classification(config.val_data, tokenizer, label_map=data.label_map, **kwargs)
    elif config.val_split > 0:
        train_idx, val_idx = stratified_split(data.targets, config.val_split, config.seed)
        data, val = data.subset(train_idx), (data.subset(val_idx) if val_idx else None)
    label_map = data.label_map
    resume_from = _check_output(out, config)

    seed_everything(config.seed)
    quantize = config.quant_format if config.method == "qlora" else None
    base_dtype = torch.float32 if config.method == "full" or config.dtype == "float32" else config.torch_dtype
    model = load_model(
        model_dir,
        task="classify",
        num_labels=label_map.num_labels,
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

    stream = BatchStream(data, config.batch_size, pad_id, config.seed, config.oversample)
    steps_per_epoch = math.ceil(stream.batches_per_epoch / config.grad_accum)
    total_steps = config.max_steps or config.epochs * steps_per_epoch
    weights = class_weights(data, config.class_weights)
    eval_batch = config.eval_batch_size or 2 * config.batch_size

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return classification_loss(logits, labels, label_map.multi_label, weights)

    def run_eval(m: nn.Module) -> dict[str, Any]:
        return evaluate(m, val, eval_batch, pad_id, weights)

    def on_best(step: int) -> None:
        export(model, config, label_map, tokenizer, out / "best")

    trainer = Trainer(model, stream, config, out, total_steps, loss_fn, run_eval if val else None, on_best)
    if resume_from is not None:
        trainer.resume(resume_from)
        print(f"resumed from {resume_from} at step {trainer.progress.step}", flush=True)
    n_train = sum(p.numel() for _, p in trainer.named_params)
    n_all = sum(p.numel() for p in model.parameters()) + sum(
        m.qweight.numel for m in model.modules() if isinstance(m, QuantLinear)
    )
    print(
        f"train: {len(data)} rows, {len(val) if val else 0} val rows, {label_map.num_labels} labels"
        f"{' (multi-label)' if label_map.multi_label else ''}; {config.method}, {n_train:,} of {n_all:,} "
        f"weights trainable; {total_steps} steps",
        flush=True,
    )
    trainer.train()

    final_dir = out / ("model" if config.method == "full" else "adapter")
    export(model, config, label_map, tokenizer, final_dir)
    report: dict[str, Any] = {}
    if trainer.last_eval is not None:
        report = {"step": trainer.progress.step, **trainer.last_eval}
        (out / "eval_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(format_metrics(report), flush=True)
    plot_run(trainer.log.records(), report or None, label_map.labels, out / "plots")
    print(f"done: {final_dir}", flush=True)
    return report


def load_classifier(model_dir: str | Path, adapter_dir: str | Path | None = None):
    """A trained classifier for eval/predict: ``(model, tokenizer, label_map, run info)``.

    With ``adapter_dir`` the base in ``model_dir`` is rebuilt as it was trained (same 4-bit format, see
    :func:`nibble.model.adapter.load_adapted`) and the adapter attached; without it, ``model_dir`` is a
    full fine-tuned model written by nibble train. An adapter without a label map (one written by PEFT)
    gets the labels 0..K-1.
    """
    from nibble.model import load_model
    from nibble.model.adapter import load_adapted, read_adapter_info

    model_dir = Path(model_dir)
    if adapter_dir is not None:
        info = read_adapter_info(adapter_dir)
        dtype = info.run.get("dtype", "float32")
        model, info = load_adapted(
            model_dir,
            adapter_dir,
            dtype=torch.float32 if dtype == "float32" else getattr(torch, dtype),
            task="classify",
        )
        run, source = info.run, info.directory
        label_map = LabelMap.load(source / LABEL_MAP) if (source / LABEL_MAP).is_file() else None
        label_map = label_map or LabelMap(list(range(info.num_labels)))
    else:
        source = model_dir
        if not (source / RUN_INFO).is_file():
            raise NibbleError(f"{source}: no {RUN_INFO}; pass --adapter, or a model directory written by nibble train")
        run = _read_run_info(source / RUN_INFO)
        label_map = LabelMap.load(source / LABEL_MAP)
        model = load_model(
            model_dir, task="classify", num_labels=label_map.num_labels, pooling=run.get("pooling", "last")
        )
    tokenizer = load_tokenizer(source if (source / "tokenizer.json").is_file() else model_dir)
    return model.eval(), tokenizer, label_map, run


def _read_run_info(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NibbleError(f"{path}: not valid JSON ({exc}); restore it from the training output") from None
    if not isinstance(info, dict):
        raise NibbleError(f"{path}: expected a JSON object")
    return info
