"""``nibble train [CONFIG.yaml] --model DIR|FILE --data FILE --output DIR [...]``: fine-tune a classifier
(``--task classify``), a chat model (``--task instruct``), a preference-tuned one (``--task preference``, ``kto``)
or a reward model (``--task reward``).

Every field of :class:`nibble.train.TrainConfig` is both a YAML key and a flag (``lora_rank`` ->
``--lora-rank``); flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse

from nibble.cli._common import add_config_flags, add_threads_flag, config_overrides
from nibble.train.config import resolve_config


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="fine-tune a model (qlora, lora or full) as a classifier or on instructions",
        description="Fine-tune a decoder as a sequence classifier (--task classify) or on instruction/chat data "
        "with the loss on the responses (--task instruct). Options come from CONFIG.yaml (keys are the flag names "
        "with underscores) and the flags below; flags win.",
    )
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml", help="YAML file with any of the options below")
    add_config_flags(parser)
    add_threads_flag(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.train.api import train

    train(resolve_config(args.config, config_overrides(args)))
    return 0
