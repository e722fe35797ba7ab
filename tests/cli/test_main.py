"""The entry point imports only the subcommand it runs; every subcommand is listed for help and errors."""

from __future__ import annotations

import subprocess
import sys

from nibble.cli.main import build_parser, command_names


def test_user_error_is_one_line_without_traceback(shared_checkpoint):
    # A bad environment setting reaches the CLI as a NibbleError: one line after the device line, exit 2.
    path, _ = shared_checkpoint("qwen3")
    result = subprocess.run(
        [sys.executable, "-m", "nibble", "generate", "--model", str(path), "--quantize", "nf4", "--prompt", "hi"],
        capture_output=True,
        text=True,
        env={"NIBBLE_KERNELS": "nonsense", "PATH": ""},
    )
    assert result.returncode == 2
    device_line, error = result.stderr.strip().split("\n")
    assert device_line.startswith("device cpu") and error.startswith("error: NIBBLE_KERNELS")
    assert "Traceback" not in result.stderr


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
