"""TrainConfig: YAML keys and flags are the same fields, flags win, values are validated by key."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from nibble.cli.main import build_parser
from nibble.errors import NibbleError
from nibble.train.config import TrainConfig, read_yaml, resolve_config

REQUIRED = ["--model", "m", "--data", "d.jsonl", "--output", "out"]


def parse(*argv):
    args = build_parser().parse_args(["train", *argv])
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return resolve_config(args.config, overrides)


def test_flags_override_yaml_and_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: base\ndata: train.jsonl\noutput: out\nlr: 0.001\nbatch_size: 4\nlora_targets: [q_proj, o_proj]\n"
        "use_rslora: true\n"
    )
    config = parse(str(path), "--lr", "0.02", "--no-use-rslora", "--max-steps", "7", "--resume")
    assert config.lr == 0.02 and config.max_steps == 7 and config.use_rslora is False
    assert config.batch_size == 4 and config.lora_targets == "q_proj,o_proj"
    assert config.model == str(tmp_path / "base")  # relative in the YAML file: from the file's directory
    assert config.resume == "latest" and config.grad_accum == TrainConfig.grad_accum
    assert parse(*REQUIRED, "--resume", "ckpt/step-5").resume == str(Path.cwd() / "ckpt/step-5")  # from the cwd
    chat = parse(*REQUIRED, "--task", "instruct", "--chat-template", "chatml")
    assert chat.chat_template == "chatml"  # a built-in name stays
    assert parse(*REQUIRED, "--cache-budget-mb", "auto").cache_budget_mb is None
    assert parse(*REQUIRED, "--cache-budget-mb", "64").cache_budget_mb == 64


def test_every_field_has_a_flag():
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        assert (flag in help_text) == f.metadata.get("flag", True), f.name  # config_file: set from CONFIG.yaml


def test_resolved_config_round_trips_through_yaml(tmp_path):
    config = parse(*REQUIRED, "--method", "lora", "--dtype", "bfloat16", "--val-split", "0.2")
    config.save(tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["method"] == "lora"
    assert resolve_config(tmp_path / "config.yaml", {}) == config


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--lr", "0"], "'lr' must be > 0"),
        (["--val-split", "1.5"], r"'val_split' must be in \[0, 1\)"),
        (["--batch-size", "0"], "'batch_size' must be >= 1"),
        (["--lora-targets", ""], "lora_targets is empty"),
        (["--max-steps", "0"], "'max_steps' must be >= 1"),
    ],
)
def test_bad_values_name_the_key(argv, message):
    with pytest.raises(NibbleError, match=message):
        parse(*REQUIRED, *argv)


def test_missing_required_key():
    with pytest.raises(NibbleError, match="'data' is required: pass --data"):
        parse("--model", "m", "--output", "o")


@pytest.mark.parametrize(
    "text,message",
    [
        ("lr: 0.1\nlearning_rate: 2", r"unknown key 'learning_rate'; did you mean 'lr'\?"),
        ("num_train_epochs: 2", r"unknown key 'num_train_epochs'; did you mean 'epochs'\?"),
        ("per_device_train_batch_size: 2", r"unknown key 'per_device_train_batch_size'; did you mean 'batch_size'\?"),
        ("gradient_accumulation_steps: 2", r"unknown key 'gradient_accumulation_steps'; did you mean 'grad_accum'\?"),
        ("zzzz: 2", r"unknown key 'zzzz'$"),
        ("lora_rnak: 4", r"unknown key 'lora_rnak'; did you mean 'lora_rank'\?"),
        ("- a\n- b", "expected a mapping"),
        ("lr: [1", "not valid YAML"),
    ],
)
def test_bad_yaml_files(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(NibbleError, match=message):
        read_yaml(path)


def test_yaml_values_are_type_checked(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: d\noutput: o\nbatch_size: eight\n")
    with pytest.raises(NibbleError, match="'batch_size' must be int, got 'eight'"):
        resolve_config(path, {})
    path.write_text("model: m\ndata: d\noutput: o\nmethod: prefix\n")
    with pytest.raises(NibbleError, match="'method' must be one of auto, qlora, lora, full"):
        resolve_config(path, {})


@pytest.mark.parametrize(
    "columns",
    ["columns: prompt=q,response=a", "columns: {prompt: q, response: a}", "columns: [prompt=q, response=a]"],
)
def test_columns_in_yaml_as_text_mapping_or_list(tmp_path, columns):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: m\ndata: d\noutput: o\ntask: instruct\n{columns}\n")
    assert resolve_config(path, {}).columns == "prompt=q,response=a"
    path.write_text(f"model: m\ndata: d\noutput: o\n{columns}\n")
    with pytest.raises(NibbleError, match="'columns' applies to task instruct only"):
        resolve_config(path, {})


def test_key_aliases_name_real_fields():
    from nibble.train.config import _KEY_ALIASES, field_names

    assert set(_KEY_ALIASES.values()) <= set(field_names())
    assert not set(_KEY_ALIASES) & set(field_names())
