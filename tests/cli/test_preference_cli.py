"""Preference tuning end to end through the real ``nibble`` command on a tiny Qwen3: DPO trains, evaluates (nibble
eval = the run's own final evaluation), resumes bit-exact after SIGKILL and merges; --precompute-reference gives
the run the adapters-off run has, is reused, and is what full fine-tuning needs; KTO trains and evaluates; a reward
model exported as a SEQ_CLS adapter scores in transformers + PEFT what nibble predict writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import helpers
import nibble
from nibble.cli.main import main

PAUSING = Path(__file__).resolve().parents[1] / "pausing_nibble.py"


def sums(seed, n):
    """Arithmetic pairs: the chosen answer right, the rejected one off by one."""
    rows = []
    for i in range(n):
        a, b = (i * 7 + seed) % 10, (i * 3 + seed) % 10
        rows.append({"prompt": f"{a}+{b}=", "chosen": f"{a + b}", "rejected": f"{a + b + 1}"})
    return rows


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pref")
    base, _ = helpers.make_hf_checkpoint(root / "base", "qwen3")
    kto = [{"prompt": r["prompt"], "completion": r[key], "label": key == "chosen"}
           for r in sums(1, 12) for key in ("chosen", "rejected")]  # fmt: skip
    return SimpleNamespace(
        root=root,
        base=base,
        train=write(root / "train.jsonl", sums(0, 24)),
        val=write(root / "val.jsonl", sums(5, 6)),
        kto=write(root / "kto.jsonl", kto),
    )


@pytest.fixture(autouse=True)
def token_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NIBBLE_TOKEN_CACHE", str(tmp_path / "tokens"))


def args(tiny, out, *extra, task="preference", data=None):
    common = ["train", "--task", task, "--model", tiny.base, "--data", data or tiny.train, "--val-data", tiny.val,
              "--output", out, "--device", "cpu", "--dtype", "float32", "--batch-size", "4", "--lr", "5e-3",
              "--log-every", "1", "--eval-every", "0", "--method", "lora", "--lora-dropout", "0"]  # fmt: skip
    return [str(a) for a in [*common, *extra]]


def train_records(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


def same(r):
    keys = ("step", "loss", "grad_norm", "rewards/chosen", "rewards/margins", "rewards/accuracies", "logps/rejected")
    return [r[k] for k in keys]


def test_dpo_trains_evaluates_resumes_bit_exact_after_sigkill_and_merges(tiny, tmp_path, capsys):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    common = ("--max-steps", "6", "--save-every", "2")
    assert main(args(tiny, whole, *common)) == 0
    records = train_records(whole)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(0 <= r["rewards/accuracies"] <= 1 for r in records)
    assert records[0]["rewards/margins"] == 0.0  # the adapter starts as the reference (B = 0)
    assert any(r["rewards/margins"] != 0 for r in records[1:])

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, str(PAUSING), "step", "5", *args(tiny, killed, *common)], env=env,
                           text=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)  # fmt: skip
    while "paused in step 5" not in (line := run.stderr.readline()):
        assert line, "the run ended before step 5"
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    capsys.readouterr()
    assert main([*args(tiny, killed, *common), "--resume"]) == 0
    assert "at step 4" in capsys.readouterr().out
    assert list(map(same, train_records(killed))) == list(map(same, records))
    weights = "adapter/adapter_model.safetensors"
    assert (killed / weights).read_bytes() == (whole / weights).read_bytes()

    report = json.loads((whole / "eval_report.json").read_text())
    assert 0 <= report["accuracy"] <= 1 and report["pairs"] == 6
    assert {p.name for p in (whole / "plots").iterdir()} >= {"loss.png", "accuracy.png", "rewards.png"}
    assert main(["eval", "--model", str(tiny.base), "--adapter", str(whole / "adapter"), "--data", str(tiny.val),
                 "--device", "cpu", "--output", str(tmp_path / "eval.json")]) == 0  # fmt: skip
    scored = json.loads((tmp_path / "eval.json").read_text())
    assert abs(scored["loss"] - report["loss"]) < 1e-6 and scored["accuracy"] == report["accuracy"]
    assert "preference accuracy" in capsys.readouterr().out

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(tiny.base), "--adapter", str(whole / "adapter"), "--output", str(merged)]) == 0
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 9, 40, 41, 3]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny.base, dtype=torch.float32)
        adapted = PeftModel.from_pretrained(base, whole / "adapter").eval()(input_ids=ids).logits
        ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, adapted, atol=1e-4, rtol=1e-4)


def test_precomputed_reference_trains_as_the_adapters_off_one_is_reused_and_serves_full_fine_tuning(
    tiny, tmp_path, capsys
):
    plain, pre = tmp_path / "plain", tmp_path / "pre"
    assert main(args(tiny, plain, "--max-steps", "3")) == 0
    assert main(args(tiny, pre, "--max-steps", "3", "--precompute-reference")) == 0
    out = capsys.readouterr().out
    assert out.count("reference: log-probs of") == 2 and "reference precomputed" in out  # train and val pairs
    for a, b in zip(train_records(plain), train_records(pre), strict=True):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-6
    assert main([*args(tiny, pre, "--max-steps", "4", "--precompute-reference"), "--resume"]) == 0
    out = capsys.readouterr().out
    assert out.count("reference: reusing") == 2 and "reference: log-probs of" not in out

    assert main(args(tiny, tmp_path / "full", "--max-steps", "2", "--method", "full")) == 2
    assert "needs --precompute-reference" in capsys.readouterr().err
    assert main(args(tiny, tmp_path / "full", "--max-steps", "2", "--method", "full", "--precompute-reference")) == 0
    report = json.loads((tmp_path / "full" / "eval_report.json").read_text())
    # nibble eval of the fully fine-tuned model: its reference is its base, loaded first and alone
    assert main(["eval", "--model", str(tmp_path / "full" / "model"), "--data", str(tiny.val), "--device", "cpu",
                 "--output", str(tmp_path / "full.json")]) == 0  # fmt: skip
    scored = json.loads((tmp_path / "full.json").read_text())
    assert abs(scored["loss"] - report["loss"]) < 1e-5 and scored["accuracy"] == report["accuracy"]


def test_kto_trains_and_evaluates_through_the_python_api(tiny, tmp_path, capsys):
    kto_val = write(tmp_path / "kto_val.jsonl", [json.loads(line) for line in tiny.kto.read_text().splitlines()][:6])
    config = dict(task="kto", model=str(tiny.base), data=str(tiny.kto), val_data=str(kto_val),
                  output=str(tmp_path / "kto"), device="cpu", dtype="float32", batch_size=4, max_steps=3, lr=5e-3,
                  log_every=1, eval_every=0, method="lora", undesirable_weight=1.5)  # fmt: skip
    result = nibble.train(config)
    assert result.step == 3 and 0 <= result.report["accuracy"] <= 1
    assert all(r["kl"] >= 0 for r in result.metrics if r["kind"] == "train")
    assert main(["eval", "--model", str(tiny.base), "--adapter", str(result.final), "--data", str(kto_val),
                 "--device", "cpu", "--output", str(tmp_path / "kto.json")]) == 0  # fmt: skip
    assert abs(json.loads((tmp_path / "kto.json").read_text())["loss"] - result.report["loss"]) < 1e-6


def test_a_reward_model_scores_in_transformers_and_peft_what_predict_writes(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from nibble.data.preference import Truncation, load_pairs
    from nibble.io.tokenizer import load_tokenizer

    out = tmp_path / "rm"
    margin = write(tmp_path / "margin.jsonl", [{**r, "margin": 0.5} for r in sums(0, 24)])
    assert main(args(tiny, out, "--max-steps", "3", task="reward", data=margin)) == 0
    adapter = out / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    report = json.loads((out / "eval_report.json").read_text())
    assert set(report) >= {"loss", "accuracy", "margin"}
    assert main(["predict", "--model", str(tiny.base), "--adapter", str(adapter), "--data", str(tiny.val),
                 "--device", "cpu", "--output", str(tmp_path / "scores.jsonl")]) == 0  # fmt: skip
    scores = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert [s["line"] for s in scores] == list(range(1, 7))

    data = load_pairs(tiny.val, load_tokenizer(tiny.base), Truncation(256))
    base = AutoModelForSequenceClassification.from_pretrained(tiny.base, num_labels=1, dtype=torch.float32)
    hf = PeftModel.from_pretrained(base, adapter).eval()
    for i, row in enumerate(scores):
        for key, side in (("chosen", data.chosen), ("rejected", data.rejected)):
            ids = torch.tensor([data.prompt[i].tolist() + side[i].tolist()])
            with torch.no_grad():
                expected = hf(input_ids=ids).logits[0, 0].item()
            assert abs(row[key] - expected) < 1e-4, (i, key)


def test_a_full_disk_under_the_token_cache_trains_from_memory_with_a_precomputed_reference(
    tiny, tmp_path, capsys, monkeypatch
):
    """The token cache cannot be written mid-build: the pairs are tokenized into memory (one note per file), the
    reference log-probs are computed but not stored beside a cache that is not there, and the run completes."""
    import errno

    from nibble.data import tokens

    write = tokens.CacheWriter._write

    def full(self, file, f, values):
        if self.directory is not None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(self, file, f, values)

    monkeypatch.setattr(tokens.CacheWriter, "_write", full)
    out = tmp_path / "run"
    assert main(args(tiny, out, "--max-steps", "2", "--precompute-reference")) == 0
    printed = capsys.readouterr().out
    assert printed.count("note: cannot write the token cache") == 2 and "into memory" in printed  # train, val
    assert printed.count("reference: log-probs of") == 2 and "stored in" not in printed
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not any(p.name.startswith("reference-") for p in tokens.token_cache_root().rglob("*"))
