"""Many-label classification (intents, product categories) at 10,000 labels on a tiny model: it trains,
evaluates and plots with records, checkpoints and plots that grow linearly in the labels (no K x K matrix),
terminal output of a few dozen lines, and a readable confusion plot of the busiest classes."""

from __future__ import annotations

import json
import random
import struct

import pytest

import helpers
from nibble.cli.main import main
from nibble.train.metrics import CONFUSED_PAIRS, DENSE_LABELS, SHOWN_CLASSES

LABELS = 10_000


def rows(n: int, seed: int) -> list[dict]:
    """Rows whose label is spelled in the text (so a row of every label is easy to write), a few labels far
    more frequent than the rest."""
    rng = random.Random(seed)
    out = [{"text": f"item {c} of the catalogue", "label": f"cat-{c}"} for c in range(LABELS)] if seed == 0 else []
    for _ in range(n):
        c = rng.randrange(12) if rng.random() < 0.5 else rng.randrange(LABELS)
        out.append({"text": f"item {c} again", "label": f"cat-{c}"})
    return out


def png_size(path) -> tuple[int, int]:
    width, height = struct.unpack(">II", path.read_bytes()[16:24])
    return width, height


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    base, _ = helpers.make_hf_checkpoint(root / "base", "qwen3")
    train, val = (
        helpers.write_jsonl(root / "train.jsonl", rows(500, 0)),
        helpers.write_jsonl(root / "val.jsonl", rows(300, 1)),
    )
    out = root / "out"
    args = ["train", "--model", base, "--data", train, "--val-data", val, "--output", out, "--dtype", "float32"]
    args += ["--max-steps", 2, "--batch-size", 8, "--eval-every", 2, "--save-every", 2, "--max-seq-len", 16]
    assert main([str(a) for a in args]) == 0
    return base, val, out


def test_ten_thousand_labels_train_evaluate_and_plot_in_linear_space(run, capsys):
    base, val, out = run
    report = json.loads((out / "eval_report.json").read_text())
    assert len(report["per_class"]) == LABELS and "confusion_matrix" not in report
    top = report["confusion_top"]
    assert len(top["labels"]) == DENSE_LABELS and len(top["matrix"]) == DENSE_LABELS
    assert all(len(row) == DENSE_LABELS + 1 for row in top["matrix"])
    assert set(top["labels"][:12]) == {f"cat-{c}" for c in range(12)}  # the frequent ones lead
    assert len(report["confused_pairs"]) <= CONFUSED_PAIRS
    # K x K int counts would be 10^8 numbers; every file the run wrote stays near K times a line
    checkpoint = max((out / "checkpoints").iterdir())
    assert (checkpoint / "state.json").stat().st_size < 4 * 2**20
    assert (out / "eval_report.json").stat().st_size < 4 * 2**20
    assert all(len(line) < 4096 for line in (out / "metrics.jsonl").read_text().splitlines())
    width, height = png_size(out / "plots" / "confusion_matrix.png")
    assert width < 3000 and height < 3000

    capsys.readouterr()
    assert main(["eval", "--model", str(base), "--adapter", str(out / "adapter"), "--data", str(val)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "precision" in line]
    assert len(printed) == SHOWN_CLASSES
