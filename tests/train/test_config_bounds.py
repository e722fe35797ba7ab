"""Options are bounded before anything is allocated: float options finite and in range, YAML configs without
aliases (a kilobyte "billion laughs" fails at once), a LoRA rank no target can hold refused naming it."""

import math

import pytest

import helpers
from nibble.cli.main import main
from nibble.errors import NibbleError
from nibble.train.config import read_yaml, resolve_config

REQUIRED = {"model": "m", "data": "d", "output": "o"}


@pytest.mark.parametrize(
    "key,value",
    [
        ("max_grad_norm", math.nan),
        ("lr", math.inf),
        ("lr", math.nan),
        ("weight_decay", math.inf),
        ("adam_eps", math.nan),
        ("lora_alpha", math.inf),
        ("warmup_ratio", math.nan),
        ("lora_dropout", math.nan),
        ("val_split", math.nan),
        ("min_lr_ratio", math.nan),
        ("adam_beta1", math.nan),
    ],
)
def test_float_options_must_be_finite(key, value):
    with pytest.raises(NibbleError) as exc:
        resolve_config(None, {**REQUIRED, key: value})
    message = str(exc.value)
    assert f"'{key}' must be" in message and "\n" not in message


def test_nan_and_inf_from_yaml_and_flags(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: m\ndata: d\noutput: o\nmax_grad_norm: .nan\n")
    with pytest.raises(NibbleError, match=r"'max_grad_norm' must be a finite number, got nan"):
        resolve_config(config, {})
    assert main(["train", "--model", "m", "--data", "d", "--output", str(tmp_path / "o"), "--lr", "inf"]) == 2
    assert capsys.readouterr().err == "error: 'lr' must be a finite number, got inf\n"


def laughs(levels: int) -> str:
    """A YAML "billion laughs": each level an anchor holding nine aliases of the one below."""
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    names = "abcdefghij"
    for i in range(1, levels):
        lines.append(f"{names[i]}: &{names[i]} [" + ", ".join([f"*{names[i - 1]}"] * 9) + "]")
    lines.append(f"lora_targets: *{names[levels - 1]}")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("levels", [5, 9])
def test_yaml_aliases_are_refused_in_one_line(tmp_path, levels):
    # 9 levels (a 1 KB file) expand to 9**9 strings: it once took 10 GB. The fix refuses it before expanding.
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs(levels))
    assert path.stat().st_size < 1100
    with pytest.raises(NibbleError, match=r"laughs.yaml line 2: YAML aliases \(\*name\) are not supported") as exc:
        resolve_config(path, {})
    assert "\n" not in str(exc.value)


def test_the_billion_laughs_is_one_line_from_the_cli(tmp_path, capsys):
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs(9))
    assert main(["train", str(path)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {path} line 2: YAML aliases (*name) are not supported; write the value out\n"
    )


@pytest.mark.parametrize(
    "text,message",
    [
        ("[" * 5_000, r"nested too deeply"),
        ("lr: 1\n" + "x" * (1 << 20), r"too large for a training config"),
        ("a: !!python/object:os.system x\n", r"not valid YAML"),
        ("- 1\n", r"expected a mapping"),
    ],
    ids=["deep", "huge", "python-tag", "list"],
)
def test_other_hostile_yaml_is_one_line(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(NibbleError, match=message) as exc:
        read_yaml(path)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("rank", [65, 10**7])
def test_a_lora_rank_larger_than_a_target_is_refused_before_loading(tmp_path, capsys, rank):
    # Rank 10**7 was OOM-killed at 23 GB; 65 is the smallest rank the tiny model's 64-wide q_proj cannot hold.
    base, _ = helpers.make_hf_checkpoint(tmp_path / "base", "qwen3")
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": "neg"}\n')
    out = tmp_path / "out"
    capsys.readouterr()
    args = ["train", "--model", str(base), "--data", str(data), "--output", str(out), "--lora-rank", str(rank)]
    assert main([*args, "--max-steps", "1", "--val-split", "0"]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: 'lora_rank' {rank} is larger than q_proj allows (64 -> 128 features, so at most 64); "
        "use --lora-rank 64 or less\n"
    )
    assert not out.exists()


def test_lora_linear_refuses_a_rank_above_its_shape():
    from torch import nn

    from nibble.nn.lora import LoRALinear

    with pytest.raises(NibbleError, match=r"lora_rank 9 is larger than a 8 -> 16 layer allows \(at most 8\)"):
        LoRALinear(nn.Linear(8, 16), rank=9)
    assert LoRALinear(nn.Linear(8, 16), rank=8).lora_A.weight.shape == (8, 8)
