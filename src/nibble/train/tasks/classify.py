"""Sequence classification: rows -> labels -> tokens -> a ``score`` head on the pooled last (or mean) token.

The task of ``--task classify``: its data and loss for training, its evaluation (loss, accuracy, macro-F1,
per-class precision/recall), ``nibble eval`` and ``nibble predict`` on a trained classifier, and
:func:`load_classifier` that rebuilds one.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from itertools import chain, islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibble.data.batching import MAX_SEQ_LEN
from nibble.data.classify import CLASS_WEIGHTS, ClassificationData, class_weights, load_classification
from nibble.data.records import place, read_records, stratified_split
from nibble.devices import autocast, describe, resolve_device, to_device
from nibble.errors import NibbleError
from nibble.io.files import open_atomic
from nibble.io.runinfo import LABEL_MAP, RUN_INFO, LabelMap, RunInfo
from nibble.io.tokenizer import Tokenizer, load_tokenizer
from nibble.model.config import ModelConfig
from nibble.model.loading import resolve_model_dir
from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights
from nibble.train.config import TrainConfig
from nibble.train.distributed import all_sum, eval_batches, gather_rows
from nibble.train.metrics import classification_loss, classification_metrics, format_metrics
from nibble.train.tasks.base import Batch, LossResult, SavedModel, TaskRun, decoder_forward

# Prediction sorts by length within windows of this many batches, so that it streams rows in file order.
PREDICT_WINDOW_BATCHES = 64
JSONL_OUTPUT = (".jsonl", ".json", ".ndjson")


def batches_by_length(
    data: ClassificationData, batch_size: int, pad_id: int, rows: Sequence[int] | None = None
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Batches of ``rows`` (default: all) of similar length, shortest first, with their row indices: a batch
    pads to its longest row, so sorting leaves the attention next to no padding to compute."""
    order = sorted(range(len(data)) if rows is None else rows, key=lambda i: len(data.ids[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield chunk, data.collate(chunk, pad_id)


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
                logits = decoder_forward(model, batch).float()
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
            logits = decoder_forward(model, batch).float()
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


class _Loss:
    """The (optionally class-weighted) loss of a run and what it averages over."""

    def __init__(self, label_map: LabelMap, weights: torch.Tensor | None):
        self.multi_label, self.weights = label_map.multi_label, weights
        self.host_weights = None if weights is None else weights.cpu().numpy()  # read once, for units

    def __call__(self, logits: torch.Tensor, batch: Batch) -> LossResult:
        if self.weights is not None and self.weights.device != logits.device:
            self.weights = self.weights.to(logits.device)  # once, at the first step: the run's device
        return classification_loss(logits, batch["labels"], self.multi_label, self.weights), {}

    def units(self, batch: Batch) -> float:
        """What the loss of ``batch`` averages over: its rows, or with class weights the weights of their classes."""
        if self.host_weights is None or self.multi_label:
            return batch["labels"].shape[0]
        return float(self.host_weights[batch["labels"].numpy()].sum())  # the host batch, before it moves


class ClassifyTask:
    """``--task classify``: a sequence classifier (see the module docstring)."""

    name = "classify"
    head = "classify"
    options = ("text_column", "label_column", "class_weights", "oversample", "pooling")

    def check(self, config: TrainConfig) -> None:
        if config.class_weights not in CLASS_WEIGHTS:
            raise NibbleError(f"'class_weights' must be one of {', '.join(CLASS_WEIGHTS)}")

    def setup(self, config: TrainConfig, model_dir: Path, tokenizer: Tokenizer) -> TaskRun:
        kwargs = dict(text_column=config.text_column, label_column=config.label_column, max_seq_len=config.max_seq_len)
        data = load_classification(config.data, tokenizer, **kwargs)
        val: ClassificationData | None = None
        if config.val_data:
            val = load_classification(config.val_data, tokenizer, label_map=data.label_map, **kwargs)
        elif config.val_split > 0:
            train_idx, val_idx = stratified_split(data.split_keys(), config.val_split, config.seed)
            data, val = data.subset(train_idx), (data.subset(val_idx) if len(val_idx) else None)
        label_map = data.label_map
        loss = _Loss(label_map, class_weights(data, config.class_weights))
        pad_id = tokenizer.pad_id

        def run_eval(m: nn.Module, batch_size: int) -> dict[str, Any]:
            return evaluate(m, val, batch_size, pad_id, loss.weights)

        summary = (
            f"{len(data)} rows, {len(val) if val else 0} val rows, {label_map.num_labels} labels"
            f"{' (multi-label)' if label_map.multi_label else ''}"
        )
        return TaskRun(
            train=data,
            val=val,
            loss=loss,
            forward=decoder_forward,
            loss_units=loss.units,
            evaluate=run_eval if val is not None else None,
            summary=summary,
            num_labels=label_map.num_labels,
            labels=label_map.labels,
            save=lambda directory: label_map.save(directory / LABEL_MAP),
            report=format_metrics,
            sample_groups=data.targets if config.oversample and not label_map.multi_label else None,
        )

    def loss_memory(self, model: ModelConfig, config: TrainConfig) -> tuple[int, int]:
        # the pooled hidden states and the logits they give, in the compute dtype
        return model.hidden_size * config.torch_dtype.itemsize, 0

    def evaluate_saved(self, request: SavedModel) -> dict[str, Any]:
        model, tokenizer, label_map, info = open_classifier(request)
        data = _read(request, tokenizer, label_map, info, request.options.get("label_column") or info.label_column)
        with autocast(next(model.parameters()).device, info.torch_dtype):
            metrics = evaluate(model, data, request.batch_size, tokenizer.pad_id)
        print(format_metrics(metrics))
        return metrics

    def predict(self, request: SavedModel, output: Path, id_column: str | None) -> int:
        """``nibble predict``: write every row's label and class probabilities to ``output`` (.jsonl or .csv)."""
        as_csv = output.suffix.lower() == ".csv"
        if not as_csv and output.suffix.lower() not in JSONL_OUTPUT:
            raise NibbleError(f"--output {output}: write predictions to a .jsonl or a .csv file")
        model, tokenizer, label_map, info = open_classifier(request)
        data = _read(request, tokenizer, label_map, info, None)
        records = read_records(request.data)  # read again, alongside the predictions, for the ids
        first = next(records)
        records = chain([first], records)
        id_column = id_column or ("id" if "id" in first[1] else None)
        if id_column is not None and id_column not in first[1]:
            fields = ", ".join(map(str, first[1]))
            raise NibbleError(
                f"{place(request.data, first[0])}: no '{id_column}' column (fields: {fields}); fix --id-column"
            )
        id_key = id_column or "row"
        names = [str(label) for label in label_map.labels]
        device = next(model.parameters()).device
        with open_atomic(output, newline="" if as_csv else None) as f, autocast(device, info.torch_dtype):
            writer = csv.writer(f) if as_csv else None
            if writer is not None:
                writer.writerow([id_key, "label", *(f"prob_{name}" for name in names)])
            for chunk, probs in iter_probs(model, data, request.batch_size, tokenizer.pad_id):
                for i, (number, record), p in zip(chunk, islice(records, len(chunk)), probs.tolist(), strict=True):
                    if number != data.lines[i]:
                        raise NibbleError(f"{request.data}: changed while predicting; run predict again")
                    if id_column is not None and id_column not in record:
                        raise NibbleError(f"{place(request.data, number)}: no '{id_column}' column; fix --id-column")
                    row_id = record[id_column] if id_column is not None else i
                    label = _predicted(label_map, p)
                    if writer is not None:
                        writer.writerow([row_id, json.dumps(label) if isinstance(label, list) else label, *p])
                    else:
                        row = {id_key: row_id, "label": label, "probs": dict(zip(names, p, strict=True))}
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        return len(data)


def _predicted(label_map: LabelMap, probs: list[float]) -> Any:
    """The label of one row's probabilities: the likeliest, or (multi-label) every label at 0.5 or more."""
    if label_map.multi_label:
        return [lab for lab, q in zip(label_map.labels, probs, strict=True) if q >= 0.5]
    return label_map.labels[max(range(len(probs)), key=probs.__getitem__)]


def _read(
    request: SavedModel, tokenizer: Tokenizer, label_map: LabelMap, info: RunInfo, label_column: str | None
) -> ClassificationData:
    """``request.data`` read as the model's training read its data (the flags given win)."""
    return load_classification(
        request.data,
        tokenizer,
        text_column=request.options.get("text_column") or info.text_column,
        label_column=label_column,
        max_seq_len=request.max_seq_len or info.max_seq_len or MAX_SEQ_LEN,
        label_map=label_map,
    )


def open_classifier(request: SavedModel) -> tuple[nn.Module, Tokenizer, LabelMap, RunInfo]:
    """:func:`load_classifier` for ``request`` on its device, printing the device line."""
    device = resolve_device(request.device)
    loaded = load_classifier(request.model, request.adapter, request.cache_budget_mb, device, any_base=request.any_base)
    print(describe(device, loaded[3].torch_dtype), flush=True)
    return loaded


def load_classifier(
    model_dir: str | Path,
    adapter_dir: str | Path | None = None,
    cache_budget_mb: int | None = None,
    device: torch.device | str = "cpu",
    *,
    any_base: bool = False,
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
        model, info = load_adapted(
            model_dir, adapter_dir, dtype=info.run.torch_dtype, task="classify", device=device, any_base=any_base
        )
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
    tokenizer.check_fits(model.config.vocab_size, model_dir)
    return model.eval(), tokenizer, label_map, run
