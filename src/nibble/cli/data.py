"""``nibble data show --model DIR|FILE --data FILE [--rows N] [...]``: look at instruction data as training renders
it before a run: each conversation's training rows, their token and target counts, the text with the trained
tokens marked (green on a terminal, ``[[...]]`` otherwise), and where a template rewrites history."""

from __future__ import annotations

import argparse
import sys

from nibble.cli._common import MAX_TOKENS, add_config_flags, bounded


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
    show.add_argument("--rows", type=bounded(int, 1, MAX_TOKENS), default=3, help="conversations to show (default 3)")
    show.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.data.chat import RenderOptions
    from nibble.errors import NibbleError
    from nibble.train.tasks.instruct import show_data

    for flag in ("model", "data"):
        if getattr(args, flag, None) is None:
            raise NibbleError(f"nibble data show: --{flag} is required")
    show_data(
        args.model,
        args.data,
        args.rows,
        getattr(args, "columns", None),
        getattr(args, "chat_template", None),
        RenderOptions(getattr(args, "thinking", None), getattr(args, "train_turns", "all")),
        colour=sys.stdout.isatty(),
    )
    return 0
