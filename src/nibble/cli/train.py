"""``nibble train [CONFIG.yaml] --model DIR|FILE --data FILE --output DIR [...]``: fine-tune a classifier
(``--task classify``) or a chat model (``--task instruct``).

Every field of :class:`nibble.train.TrainConfig` is both a YAML key and a flag (``lora_rank`` ->
``--lora-rank``); flags given on the command line win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Literal

from nibble.train.config import TrainConfig, field_names, resolve_config


def _budget(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of MiB, got {text!r}") from None


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, typed from its annotation; absent flags leave the YAML value."""
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = "auto" if f.name == "cache_budget_mb" else f.default
        text = f"{f.metadata.get('help', '')} (default: {default})"
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kind = next(a for a in typing.get_args(hint) if a is not type(None)) if union else hint
        common = dict(default=argparse.SUPPRESS, help=text, dest=f.name)
        if f.name == "resume":
            parser.add_argument(flag, nargs="?", const="latest", metavar="PATH", **common)
        elif f.name == "cache_budget_mb":
            parser.add_argument(flag, type=_budget, metavar="MIB|auto", **common)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(flag, choices=typing.get_args(kind), **common)
        else:
            parser.add_argument(flag, type=kind, metavar=f.name.upper(), **common)


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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nibble.train.classify import train_classifier
    from nibble.train.instruct import train_instruct

    overrides = {name: getattr(args, name) for name in field_names() if hasattr(args, name)}
    config = resolve_config(args.config, overrides)
    (train_instruct if config.task == "instruct" else train_classifier)(config)
    return 0
