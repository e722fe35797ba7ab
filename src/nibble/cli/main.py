"""Entry point of the ``nibble`` command: discovers subcommands and turns user errors into one line."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

import nibble
import nibble.cli
from nibble.errors import NibbleError


def command_names() -> list[str]:
    """The subcommands: one module per command in ``nibble.cli`` (helpers start with an underscore)."""
    found = sorted(info.name for info in pkgutil.iter_modules(nibble.cli.__path__))
    return [name for name in found if name != "main" and not name.startswith("_")]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser with the subcommands registered: only ``command``'s module when it names one (a run
    of one command does not import the others), else every one (for ``--help`` and for errors)."""
    parser = argparse.ArgumentParser(
        prog="nibble",
        description="Fine-tune decoder language models on one small machine: 4-bit frozen weights, LoRA adapters.",
    )
    parser.add_argument("--version", action="version", version=f"nibble {nibble.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    names = command_names()
    for name in [command] if command in names else names:
        module = importlib.import_module(f"nibble.cli.{name}")
        if hasattr(module, "register"):
            module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command)
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
