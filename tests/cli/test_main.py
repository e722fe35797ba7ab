"""The entry point imports only the subcommand it runs; every subcommand is listed for help and errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nibble.cli.main import build_parser, command_names, main


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


@pytest.mark.parametrize(
    "args,flag",
    [
        (["predict", "--model", "m", "--data", "d", "--output", "o", "--batch-size", "-3"], "--batch-size"),
        (["predict", "--model", "m", "--data", "d", "--output", "o", "--batch-size", "0"], "--batch-size"),
        (["eval", "--model", "m", "--data", "d", "--max-seq-len", "-1"], "--max-seq-len"),
        (["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", str(10**12)], "--max-new-tokens"),
        (["generate", "--model", "m", "--prompt", "x", "--temperature", "nan"], "--temperature"),
        (["generate", "--model", "m", "--prompt", "x", "--top-p", "inf"], "--top-p"),
    ],
)
def test_an_out_of_range_argument_is_one_usage_error_before_anything_runs(args, flag, capsys):
    # predict --batch-size -3 once wrote an empty file and reported 80 predictions with exit 0.
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}: must be in [" in last or f"argument {flag}: must be in (" in last


def test_bounded_numbers_fuzzed():
    import argparse
    import math

    from hypothesis import given, settings
    from hypothesis import strategies as st

    from nibble.cli._common import bounded

    parse = bounded(float, 0, 100)

    @settings(max_examples=200, deadline=None, database=None)
    @given(st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
    def check(value):
        text = str(value)
        try:
            parsed = parse(text)
        except argparse.ArgumentTypeError:
            return
        assert math.isfinite(parsed) and 0 <= parsed <= 100

    check()
