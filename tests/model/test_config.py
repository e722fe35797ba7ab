"""ModelConfig from Hugging Face config.json files, back to one transformers loads, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import hf_config
from nibble.errors import NibbleError
from nibble.model import ModelConfig


def from_transformers(model_type, **overrides) -> ModelConfig:
    return ModelConfig.from_hf(json.loads(hf_config(model_type, **overrides).to_json_string()))


def test_family_features_follow_the_architecture():
    qwen3 = from_transformers("qwen3", attention_bias=True)
    assert (qwen3.head_dim, qwen3.q_dim, qwen3.hidden_size) == (32, 128, 64)
    assert qwen3.qk_norm and qwen3.attention_bias and qwen3.attention_out_bias
    qwen2 = from_transformers("qwen2")
    assert qwen2.attention_bias and not qwen2.attention_out_bias and not qwen2.qk_norm
    llama = from_transformers("llama", tie_word_embeddings=True, mlp_bias=True)
    assert llama.tie_word_embeddings and llama.mlp_bias and llama.head_dim == 16
    mistral = from_transformers("mistral", sliding_window=8)
    assert mistral.sliding_window == 8 and not mistral.attention_bias
    assert qwen3.eos_token_ids == [258] and qwen3.pad_token_id == 256


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "llama", "mistral"])
def test_to_hf_round_trips_through_transformers(tmp_path, model_type):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = from_transformers(model_type, rope_parameters={"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0})
    config.num_labels, config.id2label = 2, {0: "neg", 1: "pos"}
    (tmp_path / "config.json").write_text(json.dumps(config.to_hf()))
    hf = AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == model_type and hf.id2label == {0: "neg", 1: "pos"}
    assert hf.rope_parameters["factor"] == 2.0 and hf.rope_parameters["rope_theta"] == 5e5
    model = AutoModelForSequenceClassification.from_config(hf)
    assert model.score.out_features == 2
    again = ModelConfig.from_hf(tmp_path)
    assert again.to_dict() == config.to_dict()


def test_old_style_rope_keys_and_llama3_scaling():
    data = json.loads(hf_config("llama").to_json_string())
    del data["rope_parameters"]
    data.update(
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        max_position_embeddings=8192,
    )
    config = ModelConfig.from_hf(data)
    assert config.rope_theta == 500000.0
    assert config.rope_scaling == {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }


def test_rope_frequencies_equal_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from nibble.model.model import rope_inv_freq

    params = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    hf = hf_config("llama", rope_parameters=params, head_dim=128, max_position_embeddings=512)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    ours = rope_inv_freq(ModelConfig.from_hf(json.loads(hf.to_json_string())))
    torch.testing.assert_close(ours, theirs, atol=0, rtol=1e-6)


BAD = [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"hidden_size": None}, "'hidden_size' must be a positive integer"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads (3)"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_type 'yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "'low_freq_factor'"),
    ({"use_sliding_window": True}, "'use_sliding_window'"),
    ({"partial_rotary_factor": 0.5}, "'partial_rotary_factor'"),
    ({"eos_token_id": 1.5}, "'eos_token_id' must be an integer, a list of integers, or null, got 1.5"),
    ({"eos_token_id": [2, "x"]}, "'eos_token_id' must be an integer, a list of integers"),
    ({"bos_token_id": "1"}, "'bos_token_id' must be an integer or null"),
    ({"rms_norm_eps": "abc"}, "'rms_norm_eps' must be a finite positive number, got 'abc'"),
    ({"rms_norm_eps": float("nan")}, "'rms_norm_eps' must be a finite positive number"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}}, "'rope_theta' must be a positive"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": True}}, "'rope_theta' must be a positive number"),
    ({"max_position_embeddings": 1.5}, "'max_position_embeddings' must be a positive integer"),
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false"),
    ({"attention_bias": 1}, "'attention_bias' must be true or false"),
    ({"num_key_value_heads": "2"}, "'num_key_value_heads' must be a positive integer or null"),
    ({"head_dim": 0}, "'head_dim' must be a positive integer or null"),
    ({"num_labels": -1}, "'num_labels' must be a positive integer or null"),
    ({"quantization_config": "bnb"}, "'quantization_config' must be an object or null"),
    ({"torch_dtype": 32}, "'torch_dtype' must be a string or null"),
]


@pytest.mark.parametrize(("change", "fragment"), BAD, ids=[b[1][:24] for b in BAD])
def test_invalid_config_names_the_file_and_key(tmp_path, change, fragment):
    data = json.loads(hf_config("qwen2").to_json_string())
    data.update(change)
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(NibbleError) as exc:
        ModelConfig.from_hf(tmp_path)
    message = str(exc.value)
    assert fragment in message and str(tmp_path / "config.json") in message and "\n" not in message


def test_sliding_window_of_mistral_is_checked(tmp_path):
    data = json.loads(hf_config("mistral").to_json_string())
    data["sliding_window"] = "abc"
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(
        NibbleError, match=r"config.json: 'sliding_window' must be a positive integer or null, got 'abc'"
    ):
        ModelConfig.from_hf(tmp_path)


def test_missing_key_missing_file_and_bad_json(tmp_path):
    data = json.loads(hf_config("qwen3").to_json_string())
    del data["intermediate_size"]
    with pytest.raises(NibbleError, match="config.json: missing 'intermediate_size'"):
        ModelConfig.from_hf(data)
    with pytest.raises(NibbleError, match="no such file"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(NibbleError, match="expected a JSON object"):
        ModelConfig.from_hf(tmp_path / "config.json")
    del data["model_type"]
    data["intermediate_size"] = 128
    data["architectures"] = ["Qwen3ForCausalLM"]
    assert ModelConfig.from_hf(data).model_type == "qwen3"
