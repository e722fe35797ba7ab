"""``nibble eval --model DIR [--adapter DIR] --data FILE [--output report.json]``: score a trained classifier."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    """Flags eval and predict share."""
    parser.add_argument(
        "--model", required=True, help="base model directory or .gguf file (or a full model from nibble train)"
    )
    parser.add_argument("--adapter", help="adapter directory written by nibble train (OUT/adapter or OUT/best)")
    parser.add_argument("--data", required=True, help=".jsonl or .csv file")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch (default: 16)")
    parser.add_argument("--text-column", help="field holding the text (default: as in training)")
    parser.add_argument("--max-seq-len", type=int, help="truncate texts to this many tokens (default: as in training)")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path``, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a trained classifier on labelled data")
    add_inference_flags(parser)
    parser.add_argument("--label-column", help="field holding the label (default: as in training)")
    parser.add_argument("--output", help="also write the metrics to this JSON file")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.data.classify import load_classification
    from nibble.train.classify import evaluate, load_classifier
    from nibble.train.metrics import format_metrics
    from nibble.train.run import autocast, pad_id_of

    model, tokenizer, label_map, info = load_classifier(args.model, args.adapter)
    data = load_classification(
        args.data,
        tokenizer,
        text_column=args.text_column or info.get("text_column", "text"),
        label_column=args.label_column or info.get("label_column", "label"),
        max_seq_len=args.max_seq_len or info.get("max_seq_len", 256),
        label_map=label_map,
    )
    device = next(model.parameters()).device
    with autocast(device, info.get("dtype", "float32")):
        metrics = evaluate(model, data, args.batch_size, pad_id_of(tokenizer, Path(args.model)))
    print(format_metrics(metrics))
    if args.output:
        write_atomic(Path(args.output), json.dumps(metrics, indent=2) + "\n")
    return 0
