"""``nibble.train(config)`` from Python: the same run as ``nibble train`` (bit-identical adapter), a result with the
run's paths and metrics, configs as a dict, a YAML file with overrides, or a TrainConfig; lazy attributes."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

import helpers
import nibble
import nibble.train.config  # the subpackage imported first: nibble.train must stay callable
from nibble.cli.main import main
from nibble.errors import NibbleError


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    base, _ = helpers.make_hf_checkpoint(root / "base", "qwen3")
    rows = [{"text": w, "label": w[0]} for w in ("apple", "berry", "avocado", "banana", "apricot")] * 4
    helpers.write_jsonl(root / "d.jsonl", rows)
    return {"model": str(base), "data": str(root / "d.jsonl"), "max_steps": 3, "eval_every": 2, "log_every": 1}


def test_nibble_train_runs_what_the_cli_runs(toy, tmp_path):
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in toy.items()]
    assert main(["train", *flags, f"--output={tmp_path / 'cli'}"]) == 0
    result = nibble.train({**toy, "output": str(tmp_path / "py")})

    assert isinstance(result, nibble.TrainResult)
    out = tmp_path / "py"
    assert (result.output, result.final, result.best) == (out, out / "adapter", out / "best")
    assert result.checkpoint == out / "checkpoints" / "step-3" and result.step == 3 and not result.stopped_early
    assert result.report == json.loads((out / "eval_report.json").read_text()) and "accuracy" in result.report
    assert [(r["kind"], r["step"]) for r in result.metrics] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("eval", 3)
    ]  # fmt: skip
    weights = "adapter/adapter_model.safetensors"
    assert (tmp_path / "cli" / weights).read_bytes() == (out / weights).read_bytes()


def test_a_yaml_file_with_overrides_and_a_train_config(toy, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({**toy, "output": str(tmp_path / "a"), "max_steps": 50}))
    result = nibble.train(config, max_steps=2, val_split=0)
    assert result.step == 2 and result.report == {} and result.best is None
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["max_steps"] == 2

    config = nibble.TrainConfig(**{**toy, "output": str(tmp_path / "a")})
    with pytest.raises(NibbleError, match="already holds a run"):  # as on the command line
        nibble.train(config)
    assert nibble.train(config, max_steps=4, val_split=0, resume="latest").step == 4
    with pytest.raises(NibbleError, match="config: unknown key 'max_step'; did you mean 'max_steps'"):
        nibble.train({**toy, "max_step": 1})


def test_lazy_attributes_of_nibble():
    # (tests/model/test_loading.py checks that `import nibble` alone imports no torch)
    from nibble.train.config import TrainConfig
    from nibble.train.run import TrainResult

    assert nibble.train is sys.modules["nibble.train"] and callable(nibble.train)
    assert (nibble.TrainConfig, nibble.TrainResult) == (TrainConfig, TrainResult)


def test_paths_may_be_path_objects(tmp_path, monkeypatch):
    import nibble.train.api as api
    import nibble.train.run

    monkeypatch.setattr(nibble.train.run, "run_training", lambda config: config)
    config = api.train({"model": tmp_path / "m", "data": tmp_path / "d.jsonl"}, output=tmp_path / "o")
    assert (config.model, config.data, config.output) == (
        str(tmp_path / "m"),
        str(tmp_path / "d.jsonl"),
        str(tmp_path / "o"),
    )
