"""load_model: sharded checkpoints, dtypes, heads, and one clear NibbleError for every bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import nibble
from helpers import right_padded_batch
from nibble.errors import NibbleError
from nibble.quant import QuantSpec


def assert_one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(exc.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_sharded_bf16_checkpoint_loads_like_the_single_file_one(hf_checkpoint):
    sharded, hf = hf_checkpoint("qwen3", max_shard_size="60KB", dtype=torch.bfloat16)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    model = nibble.load_model(sharded)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    ids, mask = right_padded_batch([8, 3])
    with torch.no_grad():
        ours, theirs = model(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=0)


def test_classify_from_a_causal_checkpoint_needs_num_labels(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    with pytest.raises(NibbleError) as exc:
        nibble.load_model(path, task="classify")
    assert_one_line(exc, "num_labels")


def test_classifier_checkpoint_keeps_its_head_and_checks_num_labels(shared_checkpoint):
    path, hf = shared_checkpoint("qwen3", num_labels=3)
    model = nibble.load_model(path, task="classify")
    assert torch.equal(model.score.weight, hf.score.weight)
    with pytest.raises(NibbleError) as exc:
        nibble.load_model(path, task="classify", num_labels=5)
    assert_one_line(exc, "model.safetensors", "score.weight", "3 labels", "num_labels=5")
    with pytest.raises(NibbleError) as exc:
        nibble.load_model(path)  # causal LM from an untied classifier: there is no LM head
    assert_one_line(exc, "lm_head.weight", "task='classify'")


def test_lazy_import_of_load_model():
    import nibble as package

    assert package.load_model is nibble.model.load_model
    with pytest.raises(AttributeError):
        package.no_such_thing  # noqa: B018
    code = "import sys, nibble; assert 'torch' not in sys.modules; nibble.load_model; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _resave(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def _break(kind, path):
    weights = path / "model.safetensors"
    if kind == "missing dir":
        shutil.rmtree(path)
    elif kind == "missing config":
        (path / "config.json").unlink()
    elif kind == "invalid config":
        (path / "config.json").write_text('{"model_type": "qwen3", ')
    elif kind == "unsupported architecture":
        _edit_config(path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    elif kind == "missing weights":
        weights.unlink()
    elif kind == "garbled weights":
        weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + bytes(100))
    elif kind == "truncated weights":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 1000])
    elif kind == "missing tensor":
        _resave(path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    elif kind == "wrong shape":
        _resave(path, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    elif kind == "unexpected tensor":
        _resave(path, lambda t: t.update({"model.layers.7.mlp.up_proj.weight": torch.zeros(2, 2)}))
    elif kind == "integer weight":
        _resave(path, lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int32)}))
    elif kind == "pickle only":
        weights.rename(path / "pytorch_model.bin")


BAD_INPUTS = {
    "missing dir": ["no such model directory"],
    "missing config": ["config.json", "no such file"],
    "invalid config": ["config.json", "not valid JSON"],
    "unsupported architecture": ["config.json", "model_type 'gpt2' is not supported"],
    "missing weights": ["no model.safetensors"],
    "garbled weights": ["model.safetensors", "garbled safetensors header"],
    "truncated weights": ["model.safetensors", "truncated"],
    "missing tensor": ["missing tensor 'model.layers.1.mlp.up_proj.weight'"],
    "wrong shape": ["model.safetensors", "model.layers.0.self_attn.k_proj.weight", "[16, 64]", "[64, 64]"],
    "unexpected tensor": ["model.safetensors", "unexpected tensor 'model.layers.7.mlp.up_proj.weight'"],
    "integer weight": ["model.safetensors", "model.norm.weight", "I32"],
    "pickle only": ["pickle", "safetensors"],
}


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_one_clear_line(hf_checkpoint, kind):
    path, _ = hf_checkpoint("qwen3")
    _break(kind, path)
    with pytest.raises(NibbleError) as exc:
        nibble.load_model(path, quantize="nf4")
    assert_one_line(exc, *BAD_INPUTS[kind])


def test_bad_options_are_rejected(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    cases = [
        ({"task": "seq2seq"}, "task 'seq2seq'"),
        ({"quantize": "fp8"}, "format 'fp8'"),
        ({"dtype": torch.int8}, "dtype torch.int8"),
        ({"quantize": QuantSpec("int4", group_size=128)}, "not divisible by INT4 group_size 128; use --group-size"),
        ({"pooling": "max", "task": "classify", "num_labels": 2}, "pooling 'max'"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(NibbleError) as exc:
            nibble.load_model(path, **kwargs)
        assert_one_line(exc, fragment)
    with pytest.raises(NibbleError) as exc:
        nibble.load_model(path / "config.json")
    assert_one_line(exc, "config.json", "not a directory")


def test_sharded_index_problems_name_the_index(hf_checkpoint):
    path, _ = hf_checkpoint("qwen3", max_shard_size="60KB")
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = sorted(set(index["weight_map"].values()))[0]
    (path / shard).rename(path / "elsewhere.bin")
    with pytest.raises(NibbleError) as exc:
        nibble.load_model(path)
    assert_one_line(exc, "model.safetensors.index.json", f"shard '{shard}' is missing")
    index_path.write_text("{]")
    with pytest.raises(NibbleError) as exc:
        nibble.load_model(path)
    assert_one_line(exc, "model.safetensors.index.json", "not a valid safetensors index")
