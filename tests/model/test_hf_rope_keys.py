"""config.json files nibble writes (merged or full fine-tuned checkpoints, GGUF conversions) carry RoPE in the keys
both transformers 4.x (``rope_theta`` + ``rope_scaling``) and 5.x (``rope_parameters``) read, with one meaning.

transformers 5 stands in for 4.x by reading a copy of the file that holds only the 4.x keys; README states the
oldest version checked by hand (4.57: equal logits of a merged checkpoint)."""

from __future__ import annotations

import json

import pytest

from gguf_files import tiny_model, write_gguf
from helpers import hf_config
from nibble.cli.main import main
from nibble.model import ModelConfig

LEGACY = ("rope_theta", "rope_scaling")
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 5e5},
    "linear": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
    },
}


def read_as(tmp_path, config: dict, keep: str) -> dict:
    """``rope_parameters`` as transformers 5 reads ``config`` with only the 4.x keys (keep="legacy") or only
    the 5.x key (keep="current")."""
    from transformers import AutoConfig

    drop = ("rope_parameters",) if keep == "legacy" else LEGACY
    directory = tmp_path / keep
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k not in drop}))
    return dict(AutoConfig.from_pretrained(directory).rope_parameters)


def check_keys(tmp_path, config: dict, rope: dict) -> None:
    assert config["rope_theta"] == rope["rope_theta"]
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    assert config["rope_scaling"] == (None if rope["rope_type"] == "default" else scaling)
    assert config["rope_parameters"] == rope
    assert read_as(tmp_path, config, "legacy") == read_as(tmp_path, config, "current")


@pytest.mark.parametrize("kind", list(ROPES))
def test_model_config_writes_rope_for_transformers_4_and_5(tmp_path, kind):
    data = json.loads(hf_config("llama", rope_parameters=dict(ROPES[kind])).to_json_string())
    check_keys(tmp_path, ModelConfig.from_hf(data).to_hf(), ROPES[kind])


@pytest.mark.parametrize("kind", ["default", "linear"])
def test_nibble_convert_writes_rope_for_transformers_4_and_5(tmp_path, kind):
    gguf = write_gguf(tmp_path / "m.gguf", tiny_model("qwen2", rope_parameters=dict(ROPES[kind])))
    assert main(["convert", "--gguf", str(gguf), "--output", str(tmp_path / "hf")]) == 0
    check_keys(tmp_path, json.loads((tmp_path / "hf" / "config.json").read_text()), ROPES[kind])
