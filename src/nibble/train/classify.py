"""The sequence-classification pipeline: rows -> labels -> tokens -> a run (see :mod:`nibble.train.run`);
and loading a trained classifier back for eval/predict.

Everything a user can get wrong (paths, data rows, labels, config values, an existing output) is
checked before the output directory is touched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibble.data.classify import ClassificationData, class_weights, load_classification
from nibble.data.records import stratified_split
from nibble.devices import to_device
from nibble.errors import NibbleError
from nibble.io.runinfo import LABEL_MAP, RUN_INFO, LabelMap, RunInfo
from nibble.io.tokenizer import Tokenizer, load_tokenizer
from nibble.model.loading import resolve_model_dir
from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights
from nibble.train.config import TrainConfig
from nibble.train.distributed import all_sum, eval_batches, gather_rows
from nibble.train.metrics import classification_loss, classification_metrics, format_metrics
from nibble.train.run import TaskRun, TrainResult, run_training


def batches_by_length(
    data: ClassificationData, batch_size: int, pad_id: int, rows: Sequence[int] | None = None
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Batches of ``rows`` (default: all) of similar length, shortest first, with their row indices: a batch
    pads to its longest row, so sorting leaves the attention next to no padding to compute."""
    order = sorted(range(len(data)) if rows is None else rows, key=lambda i: len(data.ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield chunk, data.collate(chunk, pad_id)


# Prediction sorts by length within windows of this many batches, so that it streams rows in file order.
PREDICT_WINDOW_BATCHES = 64


def iter_probs(
    model: nn.Module, data: ClassificationData, batch_size: int, pad_id: int
) -> Iterator[tuple[range, torch.Tensor]]:
    """Class probabilities a window of rows at a time, in row order: ``(rows, [len(rows), K])`` on the host
    (softmax, or sigmoid for multi-label)."""
    device = next(model.parameters()).device
    window = batch_size * PREDICT_WINDOW_BATCHES
    with torch.no_grad():
        for start in range(0, len(data), window):
            rows = range(start, min(start + window, len(data)))
            probs = torch.empty(len(rows), data.label_map.num_labels)
            for chunk, batch in batches_by_length(data, batch_size, pad_id, rows):
                batch = to_device(batch, device)
                logits = model(batch["input_ids"], batch["attention_mask"]).float()
                p = logits.sigmoid() if data.label_map.multi_label else logits.softmax(-1)
                probs[torch.tensor(chunk) - start] = p.cpu()
            yield rows, probs


def evaluate(
    model: nn.Module, data: ClassificationData, batch_size: int, pad_id: int, weights: torch.Tensor | None = None
) -> dict[str, Any]:
    """Metrics of ``model`` on labelled ``data`` (see :func:`classification_metrics`). The batches go to the
    model's device; the loss sums there and is read once at the end. Under torchrun each rank scores its share
    of the rows and every rank gets the metrics of all of them."""
    lm = data.label_map
    device = next(model.parameters()).device
    weights = None if weights is None else weights.to(device)
    total = torch.zeros((), device=device)
    probs, labels = [], []
    with torch.no_grad():
        by_length = lambda rows: batches_by_length(data, batch_size, pad_id, rows)  # noqa: E731
        for chunk, batch in eval_batches(data, batch_size, pad_id, by_length):
            host_labels = batch["labels"]
            batch = to_device(batch, device)
            logits = model(batch["input_ids"], batch["attention_mask"]).float()
            if not chunk:  # a stand-in batch: this rank's rows ran out
                continue
            labels.append(host_labels)
            total += classification_loss(logits, batch["labels"], lm.multi_label, weights) * len(chunk)
            probs.append(logits.sigmoid() if lm.multi_label else logits.softmax(-1))
    if not probs:  # a rank without rows (fewer rows than ranks)
        probs = [torch.zeros((0, lm.num_labels), device=device)]
        labels = [torch.zeros((0, lm.num_labels)) if lm.multi_label else torch.zeros(0, dtype=torch.long)]
    probs_all, labels_all = gather_rows(torch.cat(probs)), gather_rows(torch.cat(labels))
    return classification_metrics(probs_all.cpu(), labels_all.cpu(), lm, float(all_sum(total)) / len(data))


def train_classifier(config: TrainConfig) -> TrainResult:
    """Run ``nibble train --task classify`` (see :func:`nibble.train.run.run_training`)."""
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
        train_idx, val_idx = stratified_split(data.split_keys(), config.val_split, config.seed)
        data, val = data.subset(train_idx), (data.subset(val_idx) if len(val_idx) else None)
    label_map = data.label_map
    weights = class_weights(data, config.class_weights)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        nonlocal weights
        if weights is not None and weights.device != logits.device:
            weights = weights.to(logits.device)  # once, at the first step: the run's device
        return classification_loss(logits, labels, label_map.multi_label, weights)

    def loss_units(batch: dict[str, torch.Tensor]) -> float:
        """What the loss of ``batch`` averages over: its rows, or with class weights the weights of their classes."""
        if weights is None or label_map.multi_label:
            return batch["labels"].shape[0]
        return float(weights.cpu()[batch["labels"]].sum())

    def run_eval(m: nn.Module, batch_size: int) -> dict[str, Any]:
        return evaluate(m, val, batch_size, pad_id, weights)

    summary = (
        f"{len(data)} rows, {len(val) if val else 0} val rows, {label_map.num_labels} labels"
        f"{' (multi-label)' if label_map.multi_label else ''}"
    )
    groups = data.targets if config.oversample and not label_map.multi_label else None
    task = TaskRun(
        data,
        val,
        loss_fn,
        run_eval,
        summary,
        label_map=label_map,
        report=format_metrics,
        sample_groups=groups,
        loss_units=loss_units,
    )
    return run_training(config, model_dir, tokenizer, task)


def load_classifier(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    cache_budget_mb: int | None = None,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, Tokenizer, LabelMap, RunInfo]:
    """A trained classifier for eval/predict: ``(model, tokenizer, label_map, run info)``.

    With ``adapter_dir`` the base in ``model_dir`` is rebuilt as it was trained (same 4-bit format, see
    :func:`nibble.model.adapter.load_adapted`) and the adapter attached; without it, ``model_dir`` is a
    full fine-tuned model written by nibble train. An adapter without a label map (one written by PEFT)
    gets the labels 0..K-1. The model lives on ``device``. Frozen 4-bit weights keep dense copies within
    ``cache_budget_mb`` MiB (None: the device's default, see :func:`nibble.nn.quant_linear.cache_budget_bytes`).
    """
    from nibble.model import load_model
    from nibble.model.adapter import load_adapted, read_adapter_info

    model_dir = resolve_model_dir(model_dir)
    if adapter_dir is not None:
        info = read_adapter_info(adapter_dir)
        model, info = load_adapted(model_dir, adapter_dir, dtype=info.run.torch_dtype, task="classify", device=device)
        run, source = info.run, info.directory
        label_map = LabelMap.load(source / LABEL_MAP) if (source / LABEL_MAP).is_file() else None
        label_map = label_map or LabelMap(list(range(info.num_labels)))
    else:
        source = model_dir
        if not (source / RUN_INFO).is_file():
            raise NibbleError(f"{source}: no {RUN_INFO}; pass --adapter, or a model directory written by nibble train")
        run = RunInfo.load(source / RUN_INFO)
        label_map = LabelMap.load(source / LABEL_MAP)
        model = load_model(
            model_dir, task="classify", num_labels=label_map.num_labels, pooling=run.pooling, device=device
        )
    cache_dense_weights(model, cache_budget_bytes(model, run.torch_dtype, cache_budget_mb), run.torch_dtype)
    tokenizer = load_tokenizer(source if (source / "tokenizer.json").is_file() else model_dir)
    return model.eval(), tokenizer, label_map, run
