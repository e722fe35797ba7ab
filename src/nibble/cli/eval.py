"""``nibble eval --model DIR [--adapter DIR] --data FILE [--output report.json]``: score a trained model.

A classifier gets loss, accuracy, macro-F1 and per-class precision/recall; an instruction model (a CAUSAL_LM
adapter, a model trained with ``--task instruct``, or any base model with ``--task instruct``) gets the mean
loss of the response tokens and its perplexity, with the data read as training read it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from nibble.cli._common import add_inference_flags, open_classifier


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a trained classifier or instruction model on held-out data")
    add_inference_flags(parser)
    parser.add_argument(
        "--task",
        choices=("classify", "instruct"),
        help="what to score (default: what the adapter or model was trained for; instruct scores a base model)",
    )
    parser.add_argument("--label-column", help="classify: field holding the label (default: as in training)")
    parser.add_argument("--columns", help="instruct: ROLE=COLUMN pairs as in nibble train (default: as in training)")
    parser.add_argument(
        "--chat-template", help="instruct: a Jinja file or built-in name (default: the adapter's or model's template)"
    )
    parser.add_argument("--output", help="also write the metrics to this JSON file")
    parser.set_defaults(func=run)


def trained_task(model: str, adapter: str | None) -> str:
    """``classify`` or ``instruct``: what the adapter (or the model, written by nibble train) was trained for.

    Raises:
        NibbleError: a model without nibble.json and no adapter (nothing says what it is for).
    """
    from nibble.errors import NibbleError
    from nibble.io.runinfo import RUN_INFO, RunInfo
    from nibble.model.adapter import read_adapter_info
    from nibble.model.loading import resolve_model_dir

    if adapter is not None:
        return "instruct" if read_adapter_info(adapter).task == "causal_lm" else "classify"
    model_dir = resolve_model_dir(model)
    task = RunInfo.load(model_dir / RUN_INFO).task
    if task is None:
        raise NibbleError(
            f"{model_dir}: no {RUN_INFO}; pass --adapter, a model directory written by nibble train, "
            "or --task instruct to score a base model on instruction data"
        )
    return task


def run(args: argparse.Namespace) -> int:
    from nibble.io.files import write_text_atomic

    task = args.task or trained_task(args.model, args.adapter)
    metrics = evaluate_instruct(args) if task == "instruct" else evaluate_classifier(args)
    if args.output:
        write_text_atomic(args.output, json.dumps(metrics, indent=2) + "\n")
    return 0


def evaluate_classifier(args: argparse.Namespace) -> dict[str, Any]:
    from nibble.data.classify import load_classification
    from nibble.devices import autocast
    from nibble.train.classify import evaluate
    from nibble.train.metrics import format_metrics

    model, tokenizer, label_map, info = open_classifier(args)
    device = next(model.parameters()).device
    data = load_classification(
        args.data,
        tokenizer,
        text_column=args.text_column or info.text_column,
        label_column=args.label_column or info.label_column,
        max_seq_len=args.max_seq_len or info.max_seq_len or 256,
        label_map=label_map,
    )
    with autocast(device, info.torch_dtype):
        metrics = evaluate(model, data, args.batch_size, tokenizer.pad_id)
    print(format_metrics(metrics))
    return metrics


def evaluate_instruct(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from nibble.data.instruct import load_instruct
    from nibble.devices import autocast, describe, resolve_device
    from nibble.io.runinfo import RUN_INFO, RunInfo
    from nibble.model.adapter import read_adapter_info
    from nibble.model.generate import load_generator
    from nibble.model.loading import resolve_model_dir
    from nibble.train.instruct import evaluate_lm, lm_report, set_chat_template

    model_dir = resolve_model_dir(args.model)
    info = read_adapter_info(args.adapter).run if args.adapter else RunInfo.load(model_dir / RUN_INFO)
    # As training built it: an adapter's base in the run's dtype; a fully fine-tuned model in fp32 (autocast).
    dtype = info.torch_dtype if args.adapter else torch.float32
    device = resolve_device(args.device)
    model, tokenizer = load_generator(
        model_dir, args.adapter, cache_budget_mb=args.cache_budget_mb, dtype=dtype, device=device
    )
    print(describe(device, info.torch_dtype), flush=True)
    set_chat_template(tokenizer, args.chat_template, model_dir)
    data = load_instruct(
        args.data,
        tokenizer,
        max_seq_len=args.max_seq_len or info.max_seq_len or 256,
        columns=args.columns or info.columns,
    )
    with autocast(device, info.torch_dtype):
        metrics = evaluate_lm(model, data, args.batch_size, tokenizer.pad_id)
    print(lm_report(metrics))
    return metrics
