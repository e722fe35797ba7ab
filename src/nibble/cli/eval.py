"""``nibble eval --model DIR [--adapter DIR] --data FILE [--output report.json]``: score a trained classifier."""

from __future__ import annotations

import argparse
import json

from nibble.cli._common import add_inference_flags


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a trained classifier on labelled data")
    add_inference_flags(parser)
    parser.add_argument("--label-column", help="field holding the label (default: as in training)")
    parser.add_argument("--output", help="also write the metrics to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.data.classify import load_classification
    from nibble.devices import autocast, describe, resolve_device
    from nibble.io.files import write_text_atomic
    from nibble.train.classify import evaluate, load_classifier
    from nibble.train.metrics import format_metrics

    device = resolve_device(args.device)
    model, tokenizer, label_map, info = load_classifier(args.model, args.adapter, args.cache_budget_mb, device)
    print(describe(device, info.torch_dtype), flush=True)
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
    if args.output:
        write_text_atomic(args.output, json.dumps(metrics, indent=2) + "\n")
    return 0
