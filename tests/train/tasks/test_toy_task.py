"""A task of one's own: toy_task.py (the task), toy_data.py (its data) and one registry line (an entry point in
the group ``nibble.tasks``, here a dist-info directory on the path) -- nothing in src/ -- train, resume, evaluate
and export through the real ``nibble`` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import helpers

HERE = Path(__file__).resolve().parent
SRC = Path(__file__).resolve().parents[3] / "src"


def nibble(*args, env):
    result = subprocess.run(
        [sys.executable, "-m", "nibble", *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_a_task_registered_outside_src_trains_resumes_evaluates_and_exports(tmp_path):
    base, _ = helpers.make_hf_checkpoint(tmp_path / "base", "qwen3")
    helpers.write_tokenizer(base)
    words = ["red", "blue", "green", "pink"]
    rows = [{"text": f"say {w} {w}"} for w in words] * 6
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    val.write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    plugin = tmp_path / "plugin"
    dist_info = plugin / "toy_tasks-0.1.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-tasks\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[nibble.tasks]\ntoy = toy_task:ToyTask\n")  # the registry line
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (plugin, HERE, SRC))), "OMP_NUM_THREADS": "1"}
    common = ["--task", "toy", "--model", base, "--data", train, "--val-data", val, "--device", "cpu",
              "--dtype", "float32", "--lr", "0.01", "--batch-size", "4", "--log-every", "1", "--save-every", "2",
              "--eval-every", "0", "--lora-dropout", "0"]  # fmt: skip

    nibble("train", *common, "--output", tmp_path / "whole", "--max-steps", "4", env=env)
    nibble("train", *common, "--output", tmp_path / "run", "--max-steps", "2", env=env)
    resumed = nibble("train", *common, "--output", tmp_path / "run", "--max-steps", "4", "--resume", env=env)
    assert "resumed from" in resumed.stdout and "at step 2" in resumed.stdout

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in trained] == [1, 2, 3, 4]
    # the task's own metric is logged per window, and the resumed run logs what the uninterrupted one did
    assert all(0 <= r["toy_accuracy"] <= 1 for r in trained)
    same = [(r["step"], r["loss"], r["toy_accuracy"]) for r in trained]
    assert same == [(r["step"], r["loss"], r["toy_accuracy"]) for r in whole if r["kind"] == "train"]

    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "nibble.json").read_text())["task"] == "toy"
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "CAUSAL_LM"
    assert json.loads((adapter / "toy.json").read_text()) == {"rows": len(rows)}
    report = json.loads((tmp_path / "run" / "eval_report.json").read_text())

    # nibble eval finds the task from nibble.json and scores as the run's final evaluation did
    scored = nibble("eval", "--model", base, "--adapter", adapter, "--data", val, "--device", "cpu",
                    "--output", tmp_path / "eval.json", env=env)  # fmt: skip
    assert "toy accuracy" in scored.stdout
    metrics = json.loads((tmp_path / "eval.json").read_text())
    assert abs(metrics["loss"] - report["loss"]) < 1e-5 and metrics["accuracy"] == report["accuracy"]

    # exported: merged into the base, the model scores the same without the adapter
    nibble("merge", "--model", base, "--adapter", adapter, "--output", tmp_path / "merged", env=env)
    merged = nibble("eval", "--task", "toy", "--model", tmp_path / "merged", "--data", val, "--device", "cpu",
                    "--output", tmp_path / "merged.json", env=env)  # fmt: skip
    assert "toy accuracy" in merged.stdout
    assert abs(json.loads((tmp_path / "merged.json").read_text())["loss"] - metrics["loss"]) < 1e-4
