"""Outputs and inputs outside train under hostile conditions, through the real CLI on a tiny model: an adapter
applied to another base than its own, writes into a file or read-only parent or onto a full disk, a symlink as
merge --overwrite's target, predict writing over its data, an existing report."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

import helpers
from nibble.cli.main import main

WORDS = {"neg": ["bad", "awful", "sad"], "pos": ["good", "great", "nice"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny Qwen3, a LoRA classifier trained on it (2 steps), a model of the same shapes and other weights,
    and a byte copy of the base at another path."""
    root = tmp_path_factory.mktemp("outputs")
    base, _ = helpers.make_hf_checkpoint(root / "base", "qwen3")
    other, _ = helpers.make_hf_checkpoint(root / "other", "qwen3", seed=1)
    copy = root / "copy"
    shutil.copytree(base, copy)
    data = helpers.write_word_rows(root / "train.jsonl", WORDS, 16, seed=0)
    out = root / "out"
    args = ["train", "--model", base, "--data", data, "--output", out, "--batch-size", "4", "--max-steps", "2"]
    args += ["--val-split", "0", "--eval-every", "0", "--method", "lora"]
    assert main([str(a) for a in args]) == 0
    return SimpleNamespace(root=root, base=base, other=other, copy=copy, data=data, adapter=out / "adapter")


def one_line_error(capsys, *fragments):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_an_adapter_on_another_base_is_refused_unless_any_base(run, tmp_path, capsys):
    eval_args = ["eval", "--adapter", str(run.adapter), "--data", str(run.data)]
    capsys.readouterr()
    assert main([*eval_args, "--model", str(run.other)]) == 2
    one_line_error(capsys, "nibble.json: the adapter was trained on", "--any-base to apply it anyway")
    merge = ["merge", "--adapter", str(run.adapter), "--model", str(run.other)]
    assert main([*merge, "--output", str(tmp_path / "m")]) == 2
    one_line_error(capsys, "--any-base")
    assert not (tmp_path / "m").exists()
    assert main([*eval_args, "--model", str(run.other), "--any-base"]) == 0
    assert main([*merge, "--output", str(tmp_path / "m"), "--any-base"]) == 0
    assert main([*eval_args, "--model", str(run.copy)]) == 0  # the same weights at another path: its base


def test_an_adapter_without_nibble_json_is_checked_against_the_base_it_names(run, tmp_path, capsys):
    peft_only = tmp_path / "peft"
    shutil.copytree(run.adapter, peft_only)
    (peft_only / "nibble.json").unlink()
    config = json.loads((peft_only / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(run.base.resolve())
    capsys.readouterr()
    assert main(["eval", "--adapter", str(peft_only), "--data", str(run.data), "--model", str(run.other)]) == 2
    one_line_error(capsys, "adapter_config.json: the adapter was trained on", "--any-base")
    assert main(["eval", "--adapter", str(peft_only), "--data", str(run.data), "--model", str(run.copy)]) == 0
