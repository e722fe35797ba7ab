"""Entry point of the ``nibble`` command: discovers subcommands and turns user errors into one line."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import shlex
import sys

import nibble
import nibble.cli
from nibble.devices import apply_threads, is_onednn_failure, onednn_failure_message
from nibble.errors import Interrupted, NibbleError


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


def resume_command(argv: list[str]) -> str:
    """The shell command that continues an interrupted ``nibble train`` run: the same arguments, without
    ``--overwrite`` or an earlier ``--resume [PATH]``, then ``--resume``."""
    program = os.path.basename(sys.argv[0]) if sys.argv else ""
    world, local = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if world > 1:  # started by torchrun: the same launch (its rendezvous options for many machines)
        nodes = [f"--nnodes={world // local}"] if world > local else []
        prefix = ["torchrun", *nodes, f"--nproc-per-node={local}", "-m", "nibble"]
    elif program.startswith("nibble"):
        prefix = [sys.argv[0]]
    elif program == "__main__.py":
        prefix = [sys.executable, "-m", "nibble"]
    else:  # called from Python (main([...])): the installed command
        prefix = ["nibble"]
    kept: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg in ("--overwrite", "--no-overwrite") or arg.startswith("--resume="):
            continue
        if arg == "--resume":
            nxt = next(args, None)  # --resume takes an optional PATH: a following non-flag word was it
            if nxt is not None and nxt.startswith("-"):
                kept.append(nxt)
            continue
        kept.append(arg)
    return shlex.join([*prefix, *kept, "--resume"])


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 user error, 128 + the signal when interrupted:
    130 for Ctrl-C, 143 for SIGTERM)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        if hasattr(args, "threads"):  # (before any work: torch fixes its thread pool at first use)
            apply_threads(args.threads)
        result = args.func(args)
    except NibbleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:
        if exc.step is None:
            print("error: stopped at once by a second signal; only complete checkpoints were kept", file=sys.stderr)
        else:
            if os.environ.get("RANK", "0") == "0":  # (under torchrun, rank 0 speaks for every rank)
                print(f"interrupted at step {exc.step}; resume with: {resume_command(argv)}", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        if not is_onednn_failure(exc):
            raise
        print(f"error: {onednn_failure_message(exc)}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
