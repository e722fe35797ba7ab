"""``nibble eval --model DIR [--adapter DIR] --data FILE [--output report.json]``: score a trained model.

The task the model was trained for scores it (see :mod:`nibble.train.tasks`): a classifier gets loss, accuracy,
macro-F1 and per-class precision/recall; an instruction model (a CAUSAL_LM adapter, a model trained with
``--task instruct``, or any base model with ``--task instruct``) gets the mean loss of the response tokens and its
perplexity, with the data read as training read it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nibble.cli._common import add_inference_flags, saved_model, trained_task


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("eval", help="evaluate a trained classifier or instruction model on held-out data")
    add_inference_flags(parser)
    parser.add_argument(
        "--task",
        metavar="TASK",
        help="what to score: classify, instruct or a task of your own, as in nibble train (default: what the "
        "adapter or model was trained for; instruct scores a base model)",
    )
    parser.add_argument("--label-column", help="classify: field holding the label (default: as in training)")
    parser.add_argument("--columns", help="instruct: ROLE=COLUMN pairs as in nibble train (default: as in training)")
    parser.add_argument(
        "--chat-template", help="instruct: a Jinja file or built-in name (default: the adapter's or model's template)"
    )
    parser.add_argument("--output", help="also write the metrics to this JSON file (a new one: see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace the --output file if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.errors import NibbleError
    from nibble.io.files import writable_parent, write_text_atomic
    from nibble.train.tasks import get_task

    task = get_task(args.task) if args.task else trained_task(args.model, args.adapter)
    if args.output:
        if Path(args.output).exists() and not args.overwrite:
            raise NibbleError(f"{args.output}: already exists; choose another --output or pass --overwrite")
        writable_parent(args.output)
    options = {k: getattr(args, k) for k in ("text_column", "label_column", "columns", "chat_template")}
    metrics = task.evaluate_saved(saved_model(args, options))
    if args.output:
        write_text_atomic(args.output, json.dumps(metrics, indent=2) + "\n")
    return 0
