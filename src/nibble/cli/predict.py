"""``nibble predict --model DIR [--adapter DIR] --data FILE --output FILE``: label every row.

Each output line is ``{"label": <label as in the training data>, "probs": [p per label, label-map order]}``;
for multi-label models ``label`` is the list of labels with probability >= 0.5.
"""

from __future__ import annotations

import argparse
import json

from nibble.cli._common import add_inference_flags


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="predict labels for every row of a data file")
    add_inference_flags(parser)
    parser.add_argument("--output", required=True, help="JSONL file to write, one object per input row")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.data.classify import ClassificationData, read_rows, tokenize_rows
    from nibble.devices import autocast, describe, resolve_device
    from nibble.io.files import write_text_atomic
    from nibble.train.classify import load_classifier, predict_probs

    device = resolve_device(args.device)
    model, tokenizer, label_map, info = load_classifier(args.model, args.adapter, args.cache_budget_mb, device)
    print(describe(device, info.torch_dtype), flush=True)
    rows = read_rows(args.data, args.text_column or info.text_column, label_column=None)
    ids = tokenize_rows(rows, tokenizer, args.max_seq_len or info.max_seq_len or 256, args.data)
    data = ClassificationData(ids, [], label_map, [r.line for r in rows])
    with autocast(device, info.torch_dtype):
        probs = predict_probs(model, data, args.batch_size, tokenizer.pad_id)
    lines = []
    for p in probs.tolist():
        if label_map.multi_label:
            label = [lab for lab, q in zip(label_map.labels, p, strict=True) if q >= 0.5]
        else:
            label = label_map.labels[max(range(len(p)), key=p.__getitem__)]
        lines.append(json.dumps({"label": label, "probs": p}, ensure_ascii=False))
    write_text_atomic(args.output, "".join(line + "\n" for line in lines))
    print(f"wrote {len(lines)} predictions to {args.output}")
    return 0
