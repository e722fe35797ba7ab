"""``nibble train --resume`` of a run that already ended: a finished run stays untouched, a larger --max-steps
trains exactly the extra steps on a re-stretched schedule, and an early-stopped run stays stopped."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

import helpers
from nibble.cli.main import main
from nibble.train.optim import WarmupCosine

WORDS = {"neg": ["bad", "awful", "poor"], "pos": ["good", "great", "nice"]}


def rows(n: int, seed: int, flip: bool = False):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(sorted(WORDS))
        text = " ".join(rng.choice(WORDS[label]) for _ in range(3))
        out.append({"text": text, "label": {"neg": "pos", "pos": "neg"}[label] if flip else label})
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny Qwen3, training and val rows, and the val rows with opposite labels ("flipped": the val loss
    rises as training fits the training rows)."""
    root = tmp_path_factory.mktemp("resume")
    data = {"train": rows(48, seed=0), "val": rows(12, seed=1), "flipped": rows(12, seed=1, flip=True)}
    files = {name: helpers.write_jsonl(root / f"{name}.jsonl", items) for name, items in data.items()}
    return SimpleNamespace(base=helpers.make_hf_checkpoint(root / "base", "qwen3")[0], **files)


def args(toy, out, *extra):
    base = ["train", "--model", toy.base, "--data", toy.train, "--val-data", toy.val, "--output", out]
    base += ["--batch-size", 8, "--lr", 3e-3, "--warmup-ratio", 0.25, "--min-lr-ratio", 0.1, "--log-every", 1]
    base += ["--eval-every", 2, "--save-every", 2, "--early-stopping-patience", 1]
    return [str(a) for a in [*base, *extra]]


def snapshot(out: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``out`` with its bytes and modification time."""
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


def records(out: Path, kind: str):
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def state(out: Path, step: int):
    return json.loads((out / "checkpoints" / f"step-{step}" / "state.json").read_text())


def test_resuming_a_finished_run_changes_nothing_and_a_larger_max_steps_trains_the_extra_steps(toy, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(args(toy, out, "--max-steps", 8)) == 0
    assert state(out, 8)["progress"]["stopped_early"] is False  # the val loss fell at every evaluation
    before = snapshot(out)
    # stderr is no terminal here: one plain progress line per log window instead of a bar
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in progress] == [f"{s}/8" for s in range(1, 9)], progress
    assert all(" loss " in line and " tokens/s " in line and " eta " in line for line in progress)

    assert main(args(toy, out, "--max-steps", 8, "--resume")) == 0
    said = capsys.readouterr()
    assert "early stop" not in said.out + said.err
    assert (
        f"{out}: the run is finished at step 8 of 8; nothing to do. To train on, resume with a --max-steps above 8\n"
        in said.out
    )
    assert snapshot(out) == before  # not one byte, not one timestamp

    # Fewer steps than the run has: said as it is (never "extending the run from 8 to 4"), and nothing changes;
    # another per-process batch on one process keeps the global one, said without "each of the 1 ranks".
    assert main(args(toy, out, "--max-steps", 4, "--batch-size", 4, "--resume")) == 0
    said = capsys.readouterr().out
    assert "the one process now takes --batch-size 8" in said and "ranks" not in said, said
    assert f"{out}: the run is at step 8, already past the 4 steps asked; nothing to do" in said, said
    assert "extending" not in said and snapshot(out) == before
    from nibble.train.config import TrainConfig
    from nibble.train.outdir import finished_already

    config = TrainConfig(lr=3e-3, warmup_ratio=0.25, min_lr_ratio=0.1)
    assert not finished_already(out, out / "adapter", out / "checkpoints" / "step-4", 6, config)
    assert "resume: shortening the run from 8 to 6 steps;" in capsys.readouterr().out

    assert main(args(toy, out, "--max-steps", 12, "--resume")) == 0
    said = capsys.readouterr()
    assert "extending the run from 8 to 12 steps" in said.out, said.out
    assert said.err.splitlines()[0].startswith("step 9/12  loss ")
    assert [r["step"] for r in records(out, "train")] == list(range(1, 13))
    assert [r["step"] for r in records(out, "eval")] == [2, 4, 6, 8, 10, 12]
    assert state(out, 12)["progress"]["step"] == 12 and state(out, 12)["scheduler"]["total_steps"] == 12
    assert (out / "checkpoints" / "step-8" / "state.json").read_bytes() == before["checkpoints/step-8/state.json"][0]
    # Steps 1-8 kept the 8-step schedule; steps 9-12 follow the schedule of a 12-step run (warmup already past).
    lrs = {r["step"]: r["lr"] for r in records(out, "train")}
    old, new = WarmupCosine(8, 0.25, 0.1), WarmupCosine(12, 0.25, 0.1)
    assert [lrs[s] for s in range(1, 9)] == pytest.approx([3e-3 * old.factor(s - 1) for s in range(1, 9)])
    assert [lrs[s] for s in range(9, 13)] == pytest.approx([3e-3 * new.factor(s - 1) for s in range(9, 13)])
    assert json.loads((out / "adapter" / "nibble.json").read_text())["step"] == 12
    assert json.loads((out / "eval_report.json").read_text())["step"] == 12


def test_an_early_stopped_run_stays_stopped_unless_the_patience_grows(toy, tmp_path, capsys):
    out = tmp_path / "run"
    stopping = ["--val-data", toy.flipped, "--eval-every", 1, "--lr", 1e-2, "--warmup-ratio", 0]
    assert main(args(toy, out, "--max-steps", 10, *stopping)) == 0
    assert "early stop at step 2" in capsys.readouterr().out
    assert state(out, 2)["progress"]["stopped_early"] is True
    before = snapshot(out)

    assert main(args(toy, out, "--max-steps", 20, *stopping, "--resume")) == 0
    said = capsys.readouterr().out
    assert "stopped early at step 2" in said and "nothing to do" in said, said
    assert snapshot(out) == before

    # A larger patience lifts the stop: training goes on until that patience runs out too.
    assert main(args(toy, out, "--max-steps", 20, *stopping, "--early-stopping-patience", 2, "--resume")) == 0
    assert "early stop at step 3" in capsys.readouterr().out
    assert [r["step"] for r in records(out, "train")] == [1, 2, 3]


def test_the_keys_a_resume_may_change_and_those_it_keeps_cover_every_setting():
    from nibble.train.config import field_names
    from nibble.train.outdir import FIXED_ON_RESUME, MAY_CHANGE_ON_RESUME

    assert set(MAY_CHANGE_ON_RESUME) <= set(field_names()) and not set(MAY_CHANGE_ON_RESUME) & set(FIXED_ON_RESUME)
    assert sorted([*MAY_CHANGE_ON_RESUME, *FIXED_ON_RESUME]) == sorted(field_names())
    for key in ("model", "method", "quant_format", "lora_rank", "lora_alpha", "lora_targets", "dtype", "task"):
        assert key in FIXED_ON_RESUME
    assert "max_seq_len" in FIXED_ON_RESUME and "max_steps" in MAY_CHANGE_ON_RESUME


def test_resume_refuses_each_fixed_key_changed_and_takes_each_key_that_may_change(tmp_path):
    # The check against the checkpoint's own resolved config.yaml, key by key over both lists.
    import yaml

    from nibble.errors import NibbleError
    from nibble.train.outdir import FIXED_ON_RESUME, MAY_CHANGE_ON_RESUME, check_same_run
    from train.test_trainer import make_trainer

    trainer, _ = make_trainer(tmp_path, total=2)
    trainer.identity = {"model": "abc"}
    path = trainer.save()
    config = trainer.config
    saved = yaml.safe_load((path / "config.yaml").read_text())
    check_same_run(path, config, "abc")
    with pytest.raises(NibbleError, match="the model m is not the one the run was trained on"):
        check_same_run(path, config, "other")
    for key in [*FIXED_ON_RESUME, *MAY_CHANGE_ON_RESUME]:
        if key == "model":
            continue
        (path / "config.yaml").write_text(yaml.safe_dump({**saved, key: "changed!"}))
        if key in MAY_CHANGE_ON_RESUME:
            check_same_run(path, config, "abc")
        else:
            with pytest.raises(NibbleError, match=rf"'{key}' was 'changed!', now ") as exc:
                check_same_run(path, config, "abc")
            assert "\n" not in str(exc.value)


def test_resume_with_another_model_or_rank_is_one_line_naming_it(toy, tmp_path, capsys):
    out = tmp_path / "run"
    base = tmp_path / "base"
    helpers.make_hf_checkpoint(base, "qwen3", seed=0)
    assert main(args(toy, out, "--max-steps", 2, "--model", base)) == 0
    capsys.readouterr()
    assert main(args(toy, out, "--max-steps", 4, "--model", base, "--resume", "--lora-rank", 4)) == 2
    err = capsys.readouterr().err
    assert "'lora_rank' was 8, now 4" in err and err.count("\n") == 1
    helpers.make_hf_checkpoint(tmp_path / "same-shapes", "qwen3", seed=1)  # the same shapes, other weights
    capsys.readouterr()
    for name in ("model.safetensors",):
        (base / name).write_bytes((tmp_path / "same-shapes" / name).read_bytes())
    assert main(args(toy, out, "--max-steps", 4, "--model", base, "--resume")) == 2
    err = capsys.readouterr().err
    assert "is not the one the run was trained on" in err and err.count("\n") == 1


def test_run_paths_are_absolute_and_a_resume_works_from_another_directory(toy, tmp_path, monkeypatch, capsys):
    import shutil

    import yaml

    # Relative paths in a YAML file are taken from the file's directory; relative flags from the current one.
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    shutil.copy(toy.train, project / "train.jsonl")
    (project / "configs" / "run.yaml").write_text(
        f"model: {toy.base}\ndata: ../train.jsonl\nval_data: {toy.val}\nbatch_size: 8\nlog_every: 1\n"
    )
    monkeypatch.chdir(project)
    assert main(["train", "configs/run.yaml", "--output", "run", "--max-steps", "2"]) == 0
    saved = yaml.safe_load((project / "run" / "config.yaml").read_text())
    assert saved["data"] == str(project / "train.jsonl") and saved["output"] == str(project / "run")
    assert saved["config_file"] == str(project / "configs" / "run.yaml") and Path(saved["model"]).is_absolute()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert main(["train", str(project / "run" / "config.yaml"), "--max-steps", "4", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert state(project / "run", 4)["progress"]["step"] == 4 and not list(elsewhere.iterdir())
