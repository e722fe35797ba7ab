"""What several subcommands share: flags generated from TrainConfig, and the flags of the inference commands."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal

from nibble.train.config import TrainConfig


def cache_budget(text: str) -> int | None:
    """``--cache-budget-mb``: ``auto`` (None) or a number of MiB."""
    if text.strip().lower() == "auto":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of MiB, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of MiB >= 0, got {value}")
    return value


def add_config_flags(parser: argparse.ArgumentParser, names: Iterable[str] | None = None) -> None:
    """One flag per TrainConfig field (or per field in ``names``), typed from its annotation; a flag left out
    stays absent from the parsed namespace, so the YAML file's value (or the default) applies."""
    hints = typing.get_type_hints(TrainConfig)
    wanted = None if names is None else set(names)
    for f in dataclasses.fields(TrainConfig):
        if wanted is not None and f.name not in wanted:
            continue
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
            parser.add_argument(flag, type=cache_budget, metavar="MIB|auto", **common)
        elif kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        elif typing.get_origin(kind) is Literal:
            parser.add_argument(flag, choices=typing.get_args(kind), **common)
        else:
            parser.add_argument(flag, type=kind, metavar=f.name.upper(), **common)


def config_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The TrainConfig fields given as flags."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}


def _field_help(name: str) -> str:
    """The help text of TrainConfig field ``name``: flags other commands share with train say the same."""
    return next(f.metadata["help"] for f in dataclasses.fields(TrainConfig) if f.name == name)


def add_cache_budget_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-budget-mb",
        type=cache_budget,
        default=None,
        metavar="MIB|auto",
        help=f"{_field_help('cache_budget_mb')} (default: auto)",
    )


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", metavar="DEVICE", help=f"{_field_help('device')} (default: auto)")


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    """Flags eval and predict share."""
    parser.add_argument(
        "--model", required=True, help="base model directory or .gguf file (or a full model from nibble train)"
    )
    parser.add_argument("--adapter", help="adapter directory written by nibble train (OUT/adapter or OUT/best)")
    parser.add_argument(
        "--data", required=True, help=".jsonl, .csv/.tsv, .parquet or .arrow file, or a datasets save_to_disk directory"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch (default: 16)")
    parser.add_argument("--text-column", help="classify: field holding the text (default: as in training)")
    parser.add_argument("--max-seq-len", type=int, help="truncate texts to this many tokens (default: as in training)")
    add_cache_budget_flag(parser)
    add_device_flag(parser)


def open_classifier(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """``(model, tokenizer, label_map, run info)`` of ``--model``/``--adapter`` on ``--device`` (printing the
    device line), with ``--cache-budget-mb`` of dense copies; for eval and predict."""
    from nibble.devices import describe, resolve_device
    from nibble.train.classify import load_classifier

    device = resolve_device(args.device)
    loaded = load_classifier(args.model, args.adapter, args.cache_budget_mb, device)
    print(describe(device, loaded[3].torch_dtype), flush=True)
    return loaded
