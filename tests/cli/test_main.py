"""The nibble command itself: help, version, demo, and one-line errors."""

import subprocess
import sys

from nibble.cli.main import main


def test_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "nibble", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "demo" in result.stdout


def test_demo_runs(capsys):
    assert main(["demo", "--size", "128"]) == 0
    out = capsys.readouterr().out
    assert "nf4:" in out and "int4:" in out


def test_user_error_is_one_line_without_traceback():
    # A bad environment setting reaches the CLI as a NibbleError: one line, exit 2.
    result = subprocess.run(
        [sys.executable, "-m", "nibble", "demo", "--size", "64"],
        capture_output=True,
        text=True,
        env={"NIBBLE_KERNELS": "nonsense", "PATH": ""},
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("error: NIBBLE_KERNELS")
    assert "Traceback" not in result.stderr
