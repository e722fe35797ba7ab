"""PEFT adapters: one saved by PEFT loads in nibble with the same logits; nibble writes PEFT's exact layout."""

import json

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from safetensors.torch import load_file

from nibble.errors import NibbleError
from nibble.io.peft import CONFIG_NAME, WEIGHTS_NAME, adapter_config, load_adapter, save_adapter
from nibble.model import load_model


@pytest.fixture
def peft_adapter(hf_checkpoint, tmp_path):
    """A tiny Qwen3 classifier, and a PEFT LoRA adapter on it with non-zero B saved to tmp_path/adapter."""
    path, hf = hf_checkpoint("qwen3", num_labels=3)
    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        modules_to_save=["score"],
        use_rslora=True,
    )
    peft_model = get_peft_model(hf, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    return path, peft_model.eval(), tmp_path / "adapter"


def test_peft_adapter_loads_with_equal_logits(peft_adapter):
    import helpers

    base, peft_model, adapter = peft_adapter
    ours = load_model(base, task="classify", num_labels=3)
    config = load_adapter(ours, adapter)
    assert config["use_rslora"] is True
    ids, mask = helpers.right_padded_batch([7, 3, 5])
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(ours(ids, mask), expected, rtol=1e-5, atol=1e-5)


def test_nibble_writes_peft_keys_and_config(peft_adapter, tmp_path):
    base, _, adapter = peft_adapter
    ours = load_model(base, task="classify", num_labels=3)
    load_adapter(ours, adapter)
    theirs_config = json.loads((adapter / CONFIG_NAME).read_text())
    config = adapter_config(
        base_model=str(base),
        targets=["q_proj", "v_proj", "down_proj"],
        rank=4,
        alpha=8,
        dropout=0.0,
        use_rslora=True,
        task="classify",
    )
    save_adapter(ours, tmp_path / "ours", config)
    ours_config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert set(ours_config) == set(theirs_config)
    for key in ("r", "lora_alpha", "use_rslora", "task_type", "peft_type", "bias", "target_modules"):
        assert ours_config[key] == (sorted(theirs_config[key]) if key == "target_modules" else theirs_config[key])
    theirs_tensors = load_file(adapter / WEIGHTS_NAME)
    ours_tensors = load_file(tmp_path / "ours" / WEIGHTS_NAME)
    assert set(ours_tensors) == set(theirs_tensors)
    assert "base_model.model.score.weight" in ours_tensors
    for key, value in theirs_tensors.items():
        assert torch.equal(ours_tensors[key], value), key


def test_adapter_errors(peft_adapter, tmp_path):
    base, _, adapter = peft_adapter
    with pytest.raises(NibbleError, match="adapter_config.json: no such file"):
        load_adapter(load_model(base, task="classify", num_labels=3), tmp_path)
    tensors = load_file(adapter / WEIGHTS_NAME)
    wrong = {k: v for k, v in tensors.items() if "layers.1.self_attn.q_proj.lora_A" not in k}
    from safetensors.torch import save_file

    save_file(wrong, adapter / WEIGHTS_NAME)
    with pytest.raises(NibbleError, match=r"missing tensor '.*layers.1.self_attn.q_proj.lora_A.weight'"):
        load_adapter(load_model(base, task="classify", num_labels=3), adapter)
    config = json.loads((adapter / CONFIG_NAME).read_text())
    (adapter / CONFIG_NAME).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(NibbleError, match="'use_dora' = True is not supported"):
        load_adapter(load_model(base, task="classify", num_labels=3), adapter)


def _with_config(adapter, tmp_path, **changes):
    """A copy of ``adapter`` whose adapter_config.json has ``changes``."""
    import shutil

    copy = tmp_path / "changed"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / CONFIG_NAME).read_text())
    config.update(changes)
    (copy / CONFIG_NAME).write_text(json.dumps(config))
    return copy


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("r", "4"),
        ("r", 0),
        ("r", -2),
        ("r", 4.5),
        ("r", True),
        ("r", 10**12),
        ("lora_alpha", "8"),
        ("lora_alpha", 0),
        ("lora_alpha", None),
        ("lora_dropout", 1.5),
        ("lora_dropout", "0.1"),
        ("use_rslora", "yes"),
        ("use_rslora", 1),
        ("target_modules", 7),
        ("target_modules", ["q_proj", 3]),
        ("target_modules", {"q_proj": 1}),
        ("modules_to_save", "score"),
        ("target_parameters", 5),
        ("task_type", 3),
        ("base_model_name_or_path", ["x"]),
    ],
)
def test_an_adapter_config_value_of_the_wrong_type_or_range_is_one_line(peft_adapter, tmp_path, key, value):
    base, _, adapter = peft_adapter
    changed = _with_config(adapter, tmp_path, **{key: value})
    with pytest.raises(NibbleError, match=rf"adapter_config.json: '{key}' must be"):
        load_adapter(load_model(base, task="classify", num_labels=3), changed)


@pytest.mark.parametrize("alpha", ["NaN", "Infinity", "-Infinity"])
def test_a_nan_or_infinite_alpha_is_one_line(peft_adapter, tmp_path, alpha):
    base, _, adapter = peft_adapter
    changed = _with_config(adapter, tmp_path)
    text = (changed / CONFIG_NAME).read_text().replace('"lora_alpha": 8', f'"lora_alpha": {alpha}')
    (changed / CONFIG_NAME).write_text(text)
    with pytest.raises(NibbleError, match="'lora_alpha' must be a finite number"):
        load_adapter(load_model(base, task="classify", num_labels=3), changed)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_infinite_adapter_weights_are_one_line_naming_the_tensor(peft_adapter, tmp_path, bad):
    from safetensors.torch import save_file

    base, _, adapter = peft_adapter
    changed = _with_config(adapter, tmp_path)
    tensors = load_file(changed / WEIGHTS_NAME)
    name = next(k for k in sorted(tensors) if "lora_B" in k)
    tensors[name][0, 0] = bad
    save_file(tensors, changed / WEIGHTS_NAME)
    with pytest.raises(NibbleError, match=rf"'{name}' holds (NaN|a NaN|.*infinit)"):
        load_adapter(load_model(base, task="classify", num_labels=3), changed)


def test_a_target_pattern_matches_whole_names_without_backtracking(peft_adapter, tmp_path):
    base, peft_model, adapter = peft_adapter
    pattern = r".*\.(q_proj|v_proj|down_proj)"
    ours = load_model(base, task="classify", num_labels=3)
    load_adapter(ours, _with_config(adapter, tmp_path, target_modules=pattern))
    import helpers

    ids, mask = helpers.right_padded_batch([7, 3, 5])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask), peft_model(input_ids=ids, attention_mask=mask).logits)
    # (.*.*)*X made re.fullmatch take exponential time on each module name: now it matches none, at once
    hostile = _with_config(adapter, tmp_path / "h", target_modules="(.*.*)*X")
    with pytest.raises(NibbleError, match=r"'target_modules' '\(\.\*\.\*\)\*X' matches no linear layer"):
        load_adapter(load_model(base, task="classify", num_labels=3), hostile)
    with pytest.raises(NibbleError, match=r"'target_modules' .*backtracking-free match; list the module names"):
        load_adapter(
            load_model(base, task="classify", num_labels=3),
            _with_config(adapter, tmp_path / "b", target_modules=r"(q)\1"),
        )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("task", 3),
        ("dtype", 7),
        ("pooling", ["last"]),
        ("max_seq_len", "128"),
        ("max_seq_len", 0),
        ("max_seq_len", True),
        ("step", -1),
        ("step", 1.5),
        ("text_column", {"a": 1}),
        ("base_model", 12),
        ("base_fingerprint", 12),
        ("gguf_base", "model.gguf"),
        ("gguf_base", {"file": "m.gguf", "bytes": "12"}),
        ("quant", "nf4"),
    ],
)
def test_a_nibble_json_field_of_the_wrong_type_is_one_line(tmp_path, key, value):
    from nibble.io.runinfo import RunInfo

    (tmp_path / "nibble.json").write_text(json.dumps({"task": "classify", key: value}))
    with pytest.raises(NibbleError, match=rf"^{tmp_path / 'nibble.json'}: '{key}'"):
        RunInfo.load(tmp_path / "nibble.json")


@pytest.mark.parametrize("case", ["alpha 1e300", "weights 3e38", "int64 weights"])
def test_an_update_beyond_float32_or_integer_weights_are_one_line(peft_adapter, tmp_path, case):
    """Finite values that still break the model: a huge ``lora_alpha`` or huge weights make ``scaling * B @ A``
    overflow (eval reported nan, merge wrote infinities); an integer tensor is no LoRA weight."""
    from safetensors.torch import save_file

    base, _, adapter = peft_adapter
    changed = _with_config(adapter, tmp_path, **({"lora_alpha": 1e300} if case == "alpha 1e300" else {}))
    tensors = load_file(changed / WEIGHTS_NAME)
    name = next(k for k in sorted(tensors) if "lora_B" in k)
    if case == "weights 3e38":
        tensors[name] = torch.full_like(tensors[name], 3e38)
    elif case == "int64 weights":
        tensors[name] = tensors[name].to(torch.int64)
    save_file(tensors, changed / WEIGHTS_NAME)
    with pytest.raises(NibbleError) as info:
        load_adapter(load_model(base, task="classify", num_labels=3), changed)
    message = str(info.value)
    assert "\n" not in message and str(changed) in message
    assert ("not a floating-point tensor" if case == "int64 weights" else "beyond float32") in message
