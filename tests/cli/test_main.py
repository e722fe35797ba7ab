"""The entry point imports only the subcommand it runs; every subcommand is listed for help and errors."""

from __future__ import annotations

import subprocess
import sys

from nibble.cli.main import build_parser, command_names


def test_a_command_imports_only_its_own_module():
    code = (
        "import sys; from nibble.cli.main import build_parser; build_parser('quantize'); "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('nibble.cli.'))))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert "nibble.cli.quantize" in loaded
    assert not {f"nibble.cli.{name}" for name in command_names() if name != "quantize"} & set(loaded)


def test_every_command_is_registered_without_one():
    names = command_names()
    assert {"train", "eval", "predict", "generate", "quantize", "merge", "plan", "convert", "demo"} <= set(names)
    choices = build_parser()._subparsers._group_actions[0].choices
    assert set(choices) == set(names)
    assert set(build_parser("no-such-command")._subparsers._group_actions[0].choices) == set(names)
