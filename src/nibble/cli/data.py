"""``nibble data show --model DIR|FILE --data FILE [--rows N] [...]``: look at instruction data as training renders
it before a run: each conversation's training rows, their token and target counts, the text with the trained
tokens marked (green on a terminal, ``[[...]]`` otherwise), and where a template rewrites history."""

from __future__ import annotations

import argparse
import sys

from nibble.cli._common import MAX_TOKENS, add_config_flags, bounded, config_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="show instruction data as training renders and masks it")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    show = actions.add_parser(
        "show",
        help="print the first rows with the trained tokens marked",
        description="Render the first --rows conversations of --data with the model's chat template as nibble train "
        "--task instruct does, and print each training row with the trained tokens marked (green on a terminal, "
        "[[...]] otherwise), its token counts, and where the template rewrites history.",
    )
    add_config_flags(show, ("model", "data", "columns", "chat_template", "thinking", "train_turns"))
    show.add_argument("--task", help="the task whose rendering to show (default: the first built-in task that has one)")
    show.add_argument("--rows", type=bounded(int, 1, MAX_TOKENS), default=3, help="conversations to show (default 3)")
    show.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.train.config import TrainConfig
    from nibble.train.tasks import data_viewer

    task = data_viewer(args.task)
    config = TrainConfig(**{**config_overrides(args), "task": task.name}).validate(required=("model", "data"))
    task.show_data(config, args.rows, colour=sys.stdout.isatty())
    return 0
