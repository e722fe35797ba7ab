"""GRPO end to end through the real ``nibble`` command on a tiny Qwen3: it samples, scores, logs per window, writes
samples.jsonl at each evaluation and resumes bit-exact after SIGKILL (sampler RNG included); bad settings and a
failing reward are one line naming what to fix."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

import helpers
from nibble.cli.main import main

PAUSING = Path(__file__).resolve().parents[1] / "pausing_nibble.py"


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo")
    base, _ = helpers.make_hf_checkpoint(root / "base", "qwen3")
    rows = [{"prompt": f"{i % 5}+{i % 3}=", "answer": str(i % 5 + i % 3)} for i in range(12)]
    chat = [{"prompt": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]} for r in rows[:4]]
    (root / "cli_rewards.py").write_text(
        textwrap.dedent(
            """
            calls = []

            def picky(prompts, completions, answer, **_):
                # fine the first time it is called, then infinite for completion 5
                calls.append(1)
                bad = len(calls) > 1
                return [float("inf") if i == 5 and bad else float(len(c) % 2) for i, c in enumerate(completions)]
            """
        )
    )
    config = root / "grpo.yaml"
    config.write_text("rewards:\n  - exact\n  - {type: length, target: 4, penalty: 0.1, weight: 0.5}\n")
    return SimpleNamespace(
        root=root,
        base=base,
        config=config,
        train=write(root / "train.jsonl", rows),
        val=write(root / "val.jsonl", chat),
    )


def args(tiny, out, *extra):
    common = ["train", tiny.config, "--task", "grpo", "--model", tiny.base, "--data", tiny.train,
              "--val-data", tiny.val, "--output", out, "--device", "cpu", "--dtype", "float32",
              "--batch-size", "8", "--num-generations", "4", "--max-completion-len", "6", "--lr", "5e-3",
              "--log-every", "1", "--eval-every", "0", "--method", "lora", "--lora-dropout", "0",
              "--max-seq-len", "64"]  # fmt: skip
    return [str(a) for a in [*common, *extra]]


def train_records(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "train"]


KEYS = ("step", "loss", "grad_norm", "reward", "reward_length", "advantage_std", "completion_len", "truncated")


def test_grpo_trains_logs_samples_and_resumes_bit_exact_after_sigkill(tiny, tmp_path, capsys):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    common = ("--max-steps", "5", "--save-every", "2", "--temperature", "1.0", "--beta", "0.04")
    assert main(args(tiny, whole, *common)) == 0
    records = train_records(whole)
    assert [r["step"] for r in records] == list(range(1, 6))
    first = records[0]
    for key in ("reward_exact", "reward_exact_std", "reward_length_std", "reward_std", "completion_len_max", "kl",
                "clip_region", "sampler_tokens_per_s"):  # fmt: skip
        assert key in first
    assert 0 <= first["truncated"] <= 1 and 1 <= first["completion_len"] <= first["completion_len_max"] <= 6
    assert first["kl"] == pytest.approx(0.0, abs=1e-7)  # the adapter starts as the reference (B = 0)
    assert any(r["kl"] > 0 for r in records[1:])
    assert len({r["reward"] for r in records}) > 1  # sampled completions differ between steps
    samples = [json.loads(line) for line in (whole / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and {s["evaluation"] for s in samples} == {0}
    assert set(samples[0]["rewards"]) == {"exact", "length"} and samples[0]["prompt"][0]["role"] == "user"

    assert {p.name for p in (whole / "plots").iterdir()} >= {"loss.png", "reward.png", "length.png"}
    report = json.loads((whole / "eval_report.json").read_text())
    scored = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny.base), "--adapter", str(whole / "adapter"), "--data", str(tiny.val),
                 "--device", "cpu", "--output", str(scored)]) == 0  # fmt: skip
    assert json.loads(scored.read_text())["reward"] == report["reward"]  # the run's own rewards, read back
    assert "mean reward" in capsys.readouterr().out

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, str(PAUSING), "step", "4", *args(tiny, killed, *common)], env=env,
                           text=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)  # fmt: skip
    while "paused in step 4" not in (line := run.stderr.readline()):
        assert line, "the run ended before step 4"
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    capsys.readouterr()
    assert main([*args(tiny, killed, *common), "--resume"]) == 0
    assert "at step 2" in capsys.readouterr().out
    same = lambda r: [r[k] for k in KEYS]  # noqa: E731
    assert list(map(same, train_records(killed))) == list(map(same, records))
    weights = "adapter/adapter_model.safetensors"
    assert (killed / weights).read_bytes() == (whole / weights).read_bytes()


def test_num_iterations_reuses_each_sampling_and_resumes_bit_exact_between_its_steps(tiny, tmp_path, capsys):
    """``--num-iterations 2``: each sampling feeds two steps (the second logs the same completions' rewards), a
    checkpoint after the first holds the completions, and a run killed later resumes from it exactly as the
    uninterrupted one."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    common = ("--max-steps", "5", "--save-every", "3", "--num-iterations", "2", "--beta", "0.04", "--val-data", "")
    assert main(args(tiny, whole, *common)) == 0
    records = train_records(whole)
    assert [r["step"] for r in records] == list(range(1, 6))
    for first, second in (records[0:2], records[2:4]):  # the same completions, trained on twice
        assert [first[k] for k in ("reward", "completion_len", "truncated")] == [
            second[k] for k in ("reward", "completion_len", "truncated")
        ]
    assert records[0]["reward"] != records[2]["reward"] or records[0]["completion_len"] != records[2]["completion_len"]
    step3 = whole / "checkpoints" / "step-3"
    assert (step3 / "rollouts.safetensors").is_file()
    assert json.loads((step3 / "state.json").read_text())["data"]["position"] == 2  # two samplings so far

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen([sys.executable, str(PAUSING), "step", "5", *args(tiny, killed, *common)], env=env,
                           text=True, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)  # fmt: skip
    while "paused in step 5" not in (line := run.stderr.readline()):
        assert line, "the run ended before step 5"
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    capsys.readouterr()
    assert main([*args(tiny, killed, *common), "--resume"]) == 0
    assert "at step 3" in capsys.readouterr().out
    keys = (*KEYS, "clip_region", "kl")
    assert [[r[k] for k in keys] for r in train_records(killed)] == [[r[k] for k in keys] for r in records]
    weights = "adapter/adapter_model.safetensors"
    assert (killed / weights).read_bytes() == (whole / weights).read_bytes()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--batch-size", "6"), "'batch_size' 6 counts completions and must be a multiple of num_generations 4"),
        (("--rewards", "nonsense"), "type 'nonsense' is not a reward"),
        (("--num-generations", "1", "--batch-size", "1"), "at least 2 completions"),
        (("--beta", "0.1", "--method", "full"), "needs adapters to switch off"),
        (
            (
                "--num-iterations",
                "0",
            ),
            "'num_iterations' 0 must be at least 1",
        ),
    ],
)
def test_bad_settings_are_one_line(tiny, tmp_path, capsys, extra, message):
    assert main([*args(tiny, tmp_path / "out", "--max-steps", "1"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_non_finite_reward_names_the_function_and_the_row_after_checkpointing(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(tiny.root))
    out = tmp_path / "out"
    run = [*args(tiny, out, "--max-steps", "3", "--save-every", "0"), "--rewards", "cli_rewards:picky"]
    assert main(run) == 2
    err = capsys.readouterr().err
    assert "reward cli_rewards:picky returned inf for completion 5" in err and "Traceback" not in err
    assert re.search(rf"\({re.escape(str(tiny.train))} line \d+\)", err)  # the data row of that completion
    assert f"step 2 did not finish and {out / 'checkpoints' / 'step-1'} holds step 1" in err
    assert (out / "checkpoints" / "step-1").is_dir() and [r["step"] for r in train_records(out)] == [1]


def test_python_api_with_a_planned_method(tiny, tmp_path):
    """``nibble.train`` runs the task, and a memory-planned method keeps whole groups in each micro-batch."""
    import nibble

    result = nibble.train(
        {
            "task": "grpo",
            "model": str(tiny.base),
            "data": str(tiny.train),
            "output": str(tmp_path / "api"),
            "device": "cpu",
            "dtype": "float32",
            "batch_size": 8,
            "num_generations": 4,
            "max_completion_len": 4,
            "max_seq_len": 64,
            "max_steps": 2,
            "eval_every": 0,
            "val_split": 0.0,
            "method": "auto",
            "rewards": [{"type": "regex", "pattern": "[0-9]"}],
            "log_every": 1,
        }  # fmt: skip
    )
    assert result.step == 2
    records = [r for r in result.metrics if r["kind"] == "train"]
    assert [r["step"] for r in records] == [1, 2] and all(0 <= r["reward_regex"] <= 1 for r in records)


def test_two_ranks_sample_whole_groups_of_their_own_prompts(tiny, tmp_path):
    """A run under torchrun: the stream hands each rank whole prompts (batch_size / G of them), whose groups it
    samples and scores itself; the gradients all-reduce as for any task."""
    out = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "nibble"]
    flags = args(tiny, out, "--max-steps", "2", "--batch-size", "4", "--val-data", "")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([*launch, *flags], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = train_records(out)
    assert [r["step"] for r in records] == [1, 2]
    assert all(0 <= r["reward_exact"] <= 1 and r["completion_len"] >= 1 for r in records)
    assert "G=4" in result.stdout and (out / "adapter" / "adapter_model.safetensors").is_file()
