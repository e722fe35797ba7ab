"""``nibble predict --model DIR [--adapter DIR] --data FILE --output FILE.jsonl|FILE.csv``: label every row.

Each output row holds the input row's id, its ``label`` (as in the training data; for a multi-label model
the list of labels with probability >= 0.5) and the probability of every label keyed by its name. The id is
the ``--id-column`` value (by default the ``id`` column when the rows have one), else ``row``: the row's
0-based position among the data rows. JSONL rows look like ``{"id": 7, "label": "pos", "probs": {"neg": 0.1,
"pos": 0.9}}``; CSV has the columns ``id,label,prob_neg,prob_pos`` (a multi-label cell is a JSON list).
Rows are written as they are predicted, to a temporary file renamed when complete. Predictions come from the
task the model was trained for (see :mod:`nibble.train.tasks`); a task without them says so.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from nibble.cli._common import add_inference_flags, saved_model, trained_task


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("predict", help="predict labels for every row of a data file")
    add_inference_flags(parser)
    parser.add_argument("--output", required=True, help="file to write, one row per input row: .jsonl or .csv")
    parser.add_argument(
        "--id-column", help="input column that identifies each row (default: 'id' when present, else the row number)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.errors import NibbleError
    from nibble.io.files import writable_parent

    task = trained_task(args.model, args.adapter)
    if not hasattr(task, "predict"):
        raise NibbleError(f"--model/--adapter: trained for task {task.name}, which has no predictions; use nibble eval")
    output = Path(args.output)
    data = Path(args.data)
    if output.resolve() == data.resolve() or (output.exists() and data.exists() and output.samefile(data)):
        raise NibbleError(f"{output}: is the --data file; predictions go to another file")
    writable_parent(output)
    count = task.predict(saved_model(args, {"text_column": args.text_column}), output, args.id_column)
    print(f"wrote {count} predictions to {output}")
    return 0
