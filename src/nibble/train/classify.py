"""The sequence-classification pipeline: rows -> labels -> tokens -> a run (see :mod:`nibble.train.run`);
and loading a trained classifier back for eval/predict.

Everything a user can get wrong (paths, data rows, labels, config values, an existing output) is
checked before the output directory is touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibble.data.classify import ClassificationData, class_weights, load_classification
from nibble.data.records import stratified_split
from nibble.errors import NibbleError
from nibble.io.runinfo import LABEL_MAP, RUN_INFO, LabelMap, RunInfo
from nibble.io.tokenizer import Tokenizer, load_tokenizer
from nibble.model.loading import resolve_model_dir
from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights
from nibble.train.config import TrainConfig
from nibble.train.metrics import classification_loss, classification_metrics, format_metrics
from nibble.train.run import TaskRun, run_training


def batches_by_length(
    data: ClassificationData, batch_size: int, pad_id: int
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Evaluation batches of rows of similar length (shortest first), with their row indices: a batch pads to
    its longest row, so sorting leaves the attention next to no padding to compute."""
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield chunk, data.collate(chunk, pad_id)


def predict_probs(model: nn.Module, data: ClassificationData, batch_size: int, pad_id: int) -> torch.Tensor:
    """Class probabilities [N, K] in row order (softmax, or sigmoid for multi-label)."""
    order: list[int] = []
    out = []
    with torch.no_grad():
        for chunk, batch in batches_by_length(data, batch_size, pad_id):
            logits = model(batch["input_ids"], batch["attention_mask"]).float()
            out.append(logits.sigmoid() if data.label_map.multi_label else logits.softmax(-1))
            order += chunk
    probs = torch.cat(out)
    return probs[torch.argsort(torch.tensor(order, device=probs.device))]  # back to row order


def evaluate(
    model: nn.Module, data: ClassificationData, batch_size: int, pad_id: int, weights: torch.Tensor | None = None
) -> dict[str, Any]:
    """Metrics of ``model`` on labelled ``data`` (see :func:`classification_metrics`)."""
    lm = data.label_map
    total = 0.0
    probs, labels = [], []
    with torch.no_grad():
        for chunk, batch in batches_by_length(data, batch_size, pad_id):
            logits = model(batch["input_ids"], batch["attention_mask"]).float()
            total += float(classification_loss(logits, batch["labels"], lm.multi_label, weights)) * len(chunk)
            probs.append(logits.sigmoid() if lm.multi_label else logits.softmax(-1))
            labels.append(batch["labels"])
    return classification_metrics(torch.cat(probs), torch.cat(labels), lm, total / len(data))


def train_classifier(config: TrainConfig) -> dict[str, Any]:
    """Run ``nibble train --task classify``; returns the final evaluation (or {} without validation data)."""
    model_dir = resolve_model_dir(config.model)
    if not (model_dir / "config.json").is_file():
        raise NibbleError(f"{model_dir}: not a model directory (no config.json); check --model")
    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_id
    kwargs = dict(text_column=config.text_column, label_column=config.label_column, max_seq_len=config.max_seq_len)
    data = load_classification(config.data, tokenizer, **kwargs)
    val: ClassificationData | None = None
    if config.val_data:
        val = load_classification(config.val_data, tokenizer, label_map=data.label_map, **kwargs)
    elif config.val_split > 0:
        train_idx, val_idx = stratified_split(data.targets, config.val_split, config.seed)
        data, val = data.subset(train_idx), (data.subset(val_idx) if val_idx else None)
    label_map = data.label_map
    weights = class_weights(data, config.class_weights)
    eval_batch = config.eval_batch_size or 2 * config.batch_size

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return classification_loss(logits, labels, label_map.multi_label, weights)

    def run_eval(m: nn.Module) -> dict[str, Any]:
        return evaluate(m, val, eval_batch, pad_id, weights)

    summary = (
        f"{len(data)} rows, {len(val) if val else 0} val rows, {label_map.num_labels} labels"
        f"{' (multi-label)' if label_map.multi_label else ''}"
    )
    groups = data.targets if config.oversample and not label_map.multi_label else None
    task = TaskRun(
        data, val, loss_fn, run_eval, summary, label_map=label_map, report=format_metrics, sample_groups=groups
    )
    return run_training(config, model_dir, tokenizer, task)


def load_classifier(
    model_dir: str | Path, adapter_dir: str | Path | None = None, cache_budget_mb: int | None = None
) -> tuple[nn.Module, Tokenizer, LabelMap, RunInfo]:
    """A trained classifier for eval/predict: ``(model, tokenizer, label_map, run info)``.

    With ``adapter_dir`` the base in ``model_dir`` is rebuilt as it was trained (same 4-bit format, see
    :func:`nibble.model.adapter.load_adapted`) and the adapter attached; without it, ``model_dir`` is a
    full fine-tuned model written by nibble train. An adapter without a label map (one written by PEFT)
    gets the labels 0..K-1. Frozen 4-bit weights keep dense copies within ``cache_budget_mb`` MiB (None:
    half the available memory).
    """
    from nibble.model import load_model
    from nibble.model.adapter import load_adapted, read_adapter_info

    model_dir = resolve_model_dir(model_dir)
    if adapter_dir is not None:
        info = read_adapter_info(adapter_dir)
        model, info = load_adapted(model_dir, adapter_dir, dtype=info.run.torch_dtype, task="classify")
        run, source = info.run, info.directory
        label_map = LabelMap.load(source / LABEL_MAP) if (source / LABEL_MAP).is_file() else None
        label_map = label_map or LabelMap(list(range(info.num_labels)))
    else:
        source = model_dir
        if not (source / RUN_INFO).is_file():
            raise NibbleError(f"{source}: no {RUN_INFO}; pass --adapter, or a model directory written by nibble train")
        run = RunInfo.load(source / RUN_INFO)
        label_map = LabelMap.load(source / LABEL_MAP)
        model = load_model(model_dir, task="classify", num_labels=label_map.num_labels, pooling=run.pooling)
    cache_dense_weights(model, cache_budget_bytes(cache_budget_mb), run.torch_dtype)
    tokenizer = load_tokenizer(source if (source / "tokenizer.json").is_file() else model_dir)
    return model.eval(), tokenizer, label_map, run
