"""``nibble demo`` end to end on a tiny model (the real run fetches SmolLM2 and takes minutes)."""

from __future__ import annotations

import json
import re

from nibble.cli.main import main


def test_demo_runs_and_reports_accuracy_before_and_after(shared_checkpoint, tmp_path, capsys):
    path, _ = shared_checkpoint("llama")
    assert main(["demo", "--model", str(path), "--output", str(tmp_path), "--steps", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    before = re.search(r"accuracy before training: ([0-9.]+)", out)
    after = re.search(r"accuracy after training:  ([0-9.]+)", out)
    assert before and after and "[4/4] generation" in out and "Where things are:" in out
    held_out = (tmp_path / "data" / "heldout.jsonl").read_text().splitlines()
    assert len(held_out) == 70 and len((tmp_path / "data" / "train.jsonl").read_text().splitlines()) == 280
    labels = [json.loads(line)["label"] for line in held_out]
    assert all(labels.count(label) == 14 for label in set(labels))  # the held-out part is balanced
    report = json.loads((tmp_path / "run" / "eval_report.json").read_text())
    assert float(after.group(1)) == round(report["accuracy"], 3)
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    assert {"loss.png", "accuracy.png", "confusion_matrix.png"} <= {
        p.name for p in (tmp_path / "run" / "plots").iterdir()
    }
