"""Soak: a run SIGKILLed at random moments -- inside a step, a checkpoint write, an evaluation, the export of
best/ and of the final adapter -- and resumed after each kill ends bit-identical to a run never killed, with
no temporary file left behind."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import helpers
from nibble.cli.main import main
from nibble.train.outdir import WRITTEN

PAUSING = Path(__file__).resolve().parents[1] / "pausing_nibble.py"
WORDS = {"neg": ["bad", "awful", "sad"], "pos": ["good", "great", "nice"], "zero": ["okay", "meh", "plain"]}
# 12 steps: logs every 2, evaluations at 4, 8, 12, checkpoints at 3, 6, 9, 12 (two kept)
OPTIONS = ["--max-steps", "12", "--batch-size", "4", "--lr", "5e-3", "--method", "lora", "--val-split", "0.25"]
OPTIONS += ["--eval-every", "4", "--save-every", "3", "--log-every", "2", "--keep-checkpoints", "2"]
OPTIONS += ["--lora-dropout", "0.1"]


def kill_plan(rng: random.Random) -> list[tuple[str, int]]:
    """Where each process is killed, in the order a run reaches them (a resumed run counts from its start)."""
    return [
        ("step", rng.randint(1, 5)),  # before or after the first checkpoint
        ("save", rng.randint(1, 2)),  # a checkpoint half-written
        rng.choice([("eval", 1), ("best", 1)]),  # inside an evaluation, or best/ half-exported
        ("export", 1),  # the final adapter half-exported
    ]


def tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip
    }


# of the machine, not of the training
MEASURED = ("tokens_per_s", "tflops_per_s", "mfu", "peak_rss_bytes", "peak_device_bytes")


def report(out: Path) -> dict:
    """eval_report.json without the run's measured memory."""
    data = json.loads((out / "eval_report.json").read_text())
    data.pop("memory")
    return data


def metric_lines(out: Path) -> list[dict]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in MEASURED} for r in lines]


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_ends_bit_identical(tmp_path):
    seed = int(os.environ.get("NIBBLE_SOAK_SEED", random.randrange(1 << 16)))
    rng = random.Random(seed)
    base, _ = helpers.make_hf_checkpoint(tmp_path / "base", "qwen3")
    data = helpers.write_word_rows(tmp_path / "train.jsonl", WORDS, 40, seed=seed)
    args = ["train", "--model", str(base), "--data", str(data), *OPTIONS]
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main([*args, "--output", str(ref)]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plan = kill_plan(rng)
    for phase, occurrence in plan:
        command = [sys.executable, str(PAUSING), phase, str(occurrence), *args, "--output", str(out), "--resume"]
        run = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = []
        while (line := run.stderr.readline()) and "paused in" not in line:
            seen.append(line)
        assert line, f"seed {seed}, {plan}: the run ended before {phase} {occurrence}: {''.join(seen)}"
        run.send_signal(signal.SIGKILL)
        assert run.wait() == -signal.SIGKILL
    assert main([*args, "--output", str(out), "--resume"]) == 0

    why = f"seed {seed}, kills {plan}"
    for part in ("adapter", "best"):
        assert tree(out / part) == tree(ref / part), f"{part} differs ({why})"
    # checkpoints: the same steps and bytes, but for the config (resume: latest) and the manifest that hashes it
    assert tree(out / "checkpoints", ("config.yaml", "manifest.json")) == tree(
        ref / "checkpoints", ("config.yaml", "manifest.json")
    ), why
    assert metric_lines(out) == metric_lines(ref), why
    assert report(out) == report(ref), why
    litter = [p for p in out.rglob("*") if p.name.startswith(".") and p.name != WRITTEN]  # (the record stays)
    assert not litter, f"temporary files left: {litter} ({why})"
