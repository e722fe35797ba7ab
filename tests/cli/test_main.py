"""The nibble command itself: help and one-line errors (``nibble demo`` has its own test, test_demo.py)."""

import subprocess
import sys


def test_help_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "nibble", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "demo" in result.stdout


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
