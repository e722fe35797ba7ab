"""``nibble predict --model DIR [--adapter DIR] --data FILE --output FILE.jsonl|FILE.csv``: label every row.

Each output row holds the input row's id, its ``label`` (as in the training data; for a multi-label model
the list of labels with probability >= 0.5) and the probability of every label keyed by its name. The id is
the ``--id-column`` value (by default the ``id`` column when the rows have one), else ``row``: the row's
0-based position among the data rows. JSONL rows look like ``{"id": 7, "label": "pos", "probs": {"neg": 0.1,
"pos": 0.9}}``; CSV has the columns ``id,label,prob_neg,prob_pos`` (a multi-label cell is a JSON list).
Rows are written as they are predicted, to a temporary file renamed when complete.
"""

from __future__ import annotations

import argparse
import csv
import json
from itertools import chain, islice
from pathlib import Path

from nibble.cli._common import add_inference_flags, open_classifier

JSONL_OUTPUT = (".jsonl", ".json", ".ndjson")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="predict labels for every row of a data file")
    add_inference_flags(parser)
    parser.add_argument("--output", required=True, help="file to write, one row per input row: .jsonl or .csv")
    parser.add_argument(
        "--id-column", help="input column that identifies each row (default: 'id' when present, else the row number)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.data.classify import load_classification
    from nibble.data.records import place, read_records
    from nibble.devices import autocast
    from nibble.errors import NibbleError
    from nibble.io.files import open_atomic
    from nibble.train.classify import iter_probs

    output = Path(args.output)
    as_csv = output.suffix.lower() == ".csv"
    if not as_csv and output.suffix.lower() not in JSONL_OUTPUT:
        raise NibbleError(f"--output {output}: write predictions to a .jsonl or a .csv file")
    model, tokenizer, label_map, info = open_classifier(args)
    device = next(model.parameters()).device
    data = load_classification(
        args.data,
        tokenizer,
        text_column=args.text_column or info.text_column,
        label_column=None,
        max_seq_len=args.max_seq_len or info.max_seq_len or 256,
        label_map=label_map,
    )
    records = read_records(args.data)  # read again, alongside the predictions, for the ids
    first = next(records)
    records = chain([first], records)
    id_column = args.id_column or ("id" if "id" in first[1] else None)
    if id_column is not None and id_column not in first[1]:
        fields = ", ".join(map(str, first[1]))
        raise NibbleError(f"{place(args.data, first[0])}: no '{id_column}' column (fields: {fields}); fix --id-column")
    id_key = id_column or "row"
    names = [str(label) for label in label_map.labels]
    with open_atomic(output, newline="" if as_csv else None) as f, autocast(device, info.torch_dtype):
        writer = csv.writer(f) if as_csv else None
        if writer is not None:
            writer.writerow([id_key, "label", *(f"prob_{name}" for name in names)])
        for chunk, probs in iter_probs(model, data, args.batch_size, tokenizer.pad_id):
            for i, (number, record), p in zip(chunk, islice(records, len(chunk)), probs.tolist(), strict=True):
                if number != data.lines[i]:
                    raise NibbleError(f"{args.data}: changed while predicting; run predict again")
                if id_column is not None and id_column not in record:
                    raise NibbleError(f"{place(args.data, number)}: no '{id_column}' column; fix --id-column")
                row_id = record[id_column] if id_column is not None else i
                if label_map.multi_label:
                    label = [lab for lab, q in zip(label_map.labels, p, strict=True) if q >= 0.5]
                else:
                    label = label_map.labels[max(range(len(p)), key=p.__getitem__)]
                if writer is not None:
                    writer.writerow([row_id, json.dumps(label) if isinstance(label, list) else label, *p])
                else:
                    row = {id_key: row_id, "label": label, "probs": dict(zip(names, p, strict=True))}
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"wrote {len(data)} predictions to {output}")
    return 0
