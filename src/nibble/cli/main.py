"""Entry point of the ``nibble`` command: discovers subcommands and turns user errors into one line."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import nibble
import nibble.cli
from nibble.errors import NibbleError


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand module in ``nibble.cli`` registered."""
    parser = argparse.ArgumentParser(
        prog="nibble",
        description="Fine-tune decoder language models on one small machine: 4-bit frozen weights, LoRA adapters.",
    )
    parser.add_argument("--version", action="version", version=f"nibble {nibble.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(nibble.cli.__path__), key=lambda m: m.name):
        if info.name == "main" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"nibble.cli.{info.name}")
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except NibbleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
