"""What several subcommands share: flags generated from TrainConfig, and the flags of the inference commands."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal

from nibble.train.config import TrainConfig

MAX_TOKENS = 1 << 20  # the most tokens a flag may ask for (a sequence, new tokens): beyond any model's context
MAX_BATCH = 1 << 16


def bounded(kind: type, low: float, high: float, *, open_low: bool = False) -> Any:
    """An argparse ``type`` for numbers of ``kind`` in ``[low, high]`` (``(low, high]`` with ``open_low``): NaN,
    infinities and values outside are one usage error naming the range."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        inside = (low < value if open_low else low <= value) and value <= high  # (False for NaN)
        if not inside:
            bracket = "(" if open_low else "["
            raise argparse.ArgumentTypeError(f"must be in {bracket}{kind(low)}, {kind(high)}], got {text}")
        return value

    return parse


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
        if (wanted is not None and f.name not in wanted) or not f.metadata.get("flag", True):
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
    add_threads_flag(parser)


def add_threads_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=bounded(int, 1, 4096),
        metavar="N",
        help="CPU threads for torch (default: $NIBBLE_THREADS, else torch's choice); the device line shows it",
    )


def add_any_base_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--any-base",
        action="store_true",
        help="apply the adapter to --model even where it differs from the base the adapter was trained on",
    )


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    """Flags eval and predict share."""
    parser.add_argument(
        "--model", required=True, help="base model directory or .gguf file (or a full model from nibble train)"
    )
    parser.add_argument("--adapter", help="adapter directory written by nibble train (OUT/adapter or OUT/best)")
    parser.add_argument(
        "--data", required=True, help=".jsonl, .csv/.tsv, .parquet or .arrow file, or a datasets save_to_disk directory"
    )
    parser.add_argument(
        "--batch-size", type=bounded(int, 1, MAX_BATCH), default=16, help="rows per batch (default: 16)"
    )
    parser.add_argument("--text-column", help="classify: field holding the text (default: as in training)")
    parser.add_argument(
        "--max-seq-len",
        type=bounded(int, 1, MAX_TOKENS),
        help="truncate texts to this many tokens (default: as in training)",
    )
    add_any_base_flag(parser)
    add_cache_budget_flag(parser)
    add_device_flag(parser)


def saved_model(args: argparse.Namespace, options: dict[str, Any]) -> Any:
    """The trained model, data and flags of an eval or predict command line, for its task."""
    from nibble.train.tasks import SavedModel

    return SavedModel(
        model=args.model,
        adapter=args.adapter,
        data=args.data,
        batch_size=args.batch_size,
        device=args.device,
        cache_budget_mb=args.cache_budget_mb,
        max_seq_len=args.max_seq_len,
        any_base=args.any_base,
        options=options,
    )


def trained_task(model: str, adapter: str | None) -> Any:
    """The task an adapter (or a model written by nibble train) was trained for; an adapter written by PEFT
    (no nibble.json) by its head.

    Raises:
        NibbleError: a model without nibble.json and no adapter (nothing says what it is for).
    """
    from nibble.errors import NibbleError
    from nibble.io.runinfo import RUN_INFO, RunInfo
    from nibble.model.adapter import read_adapter_info
    from nibble.model.loading import resolve_model_dir
    from nibble.train.tasks import get_task, task_for_head

    if adapter is not None:
        info = read_adapter_info(adapter)
        return get_task(info.run.task) if info.run.task else task_for_head(info.task)
    model_dir = resolve_model_dir(model)
    task = RunInfo.load(model_dir / RUN_INFO).task
    if task is None:
        raise NibbleError(
            f"{model_dir}: no {RUN_INFO}; pass --adapter, a model directory written by nibble train, "
            "or --task instruct to score a base model on instruction data"
        )
    return get_task(task)
