"""``nibble merge``: the merged checkpoint, loaded by transformers, computes what PEFT (or nibble's QLoRA model)
computes with the adapter attached; classifier heads, tied heads, shards, dtypes and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from helpers import right_padded_batch
from nibble.cli.main import main
from nibble.errors import NibbleError
from nibble.model.adapter import load_adapted
from nibble.model.merge import merge_adapter
from nibble.quant import QuantSpec
from peft_adapters import save_peft_adapter

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def stored_tensors(directory):
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize(
    ("family", "kwargs", "targets"),
    [("qwen3", {}, ("q_proj", "v_proj")), ("llama", {"tie_word_embeddings": True}, ALL)],
)
def test_merged_causal_lm_equals_peft(shared_checkpoint, tmp_path, family, kwargs, targets):
    base, hf = shared_checkpoint(family, **kwargs)
    peft_model = save_peft_adapter(hf, tmp_path / "adapter", targets=targets)
    assert (
        main(["merge", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m")])
        == 0
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    ids, mask = right_padded_batch([9, 5])
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
        got = merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=2e-5, rtol=1e-5)
    names = set(stored_tensors(tmp_path / "m"))
    assert ("lm_head.weight" in names) != bool(kwargs.get("tie_word_embeddings"))
    assert not any("lora" in n for n in names)
    assert (tmp_path / "m" / "tokenizer.json").is_file() and not (tmp_path / "m" / "adapter_config.json").exists()


def test_merged_classifier_equals_peft_with_its_head_and_labels(shared_checkpoint, tmp_path):
    base, _ = shared_checkpoint("qwen2")
    torch.manual_seed(3)  # transformers draws the fresh score head
    hf = AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, dtype=torch.float32).eval()
    peft_model = save_peft_adapter(hf, tmp_path / "adapter", targets=("q_proj", "up_proj"))
    (tmp_path / "adapter" / "label_map.json").write_text(json.dumps({"labels": ["neg", "neu", "pos"]}))
    out, info = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")
    assert info.task == "classify" and info.labels == ["neg", "neu", "pos"]
    merged = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32).eval()
    assert merged.config.id2label == {0: "neg", 1: "neu", 2: "pos"}
    ids, mask = right_padded_batch([7, 11, 4])
    with torch.no_grad():
        want = peft_model(input_ids=ids, attention_mask=mask).logits
        got = merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert json.loads((out / "label_map.json").read_text())["labels"] == ["neg", "neu", "pos"]


def test_qlora_adapter_merges_into_the_dequantized_base(shared_checkpoint, tmp_path):
    base, hf = shared_checkpoint("qwen3")
    peft_model = save_peft_adapter(hf, tmp_path / "adapter", targets=ALL)
    # written in the form nibble.json had before 'quant' held the format as one object; still read
    run = {"task": "causal_lm", "method": "qlora", "quantize": "nf4", "double_quant": True, "blocksize": 64}
    (tmp_path / "adapter" / "nibble.json").write_text(json.dumps(run))
    ours, info = load_adapted(base, tmp_path / "adapter")
    assert info.quant == QuantSpec("nf4", double_quant=True)
    out, _ = merge_adapter(base, tmp_path / "adapter", tmp_path / "f32", shard_bytes=60_000)
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = right_padded_batch([8, 6])
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        want = ours(ids, mask)[mask.bool()]
        dense = peft_model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert (got - dense).abs().max() > 1e-2  # the 4-bit base, not the original weights, was merged
    written = json.loads((out / "nibble.json").read_text())
    assert written["quant"] is None and written["merged_from"] == str(tmp_path / "adapter")

    bf16, _ = merge_adapter(base, tmp_path / "adapter", tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    full, half = stored_tensors(out), stored_tensors(bf16)
    assert full.keys() == half.keys()
    for name, tensor in half.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, full[name].to(torch.bfloat16)), name


def test_bad_input_is_one_line(shared_checkpoint, tmp_path, capsys):
    base, hf = shared_checkpoint("qwen3")
    other, other_hf = shared_checkpoint("qwen3", intermediate_size=96)
    save_peft_adapter(other_hf, tmp_path / "other", targets=("down_proj",))
    save_peft_adapter(hf, tmp_path / "adapter")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    cases = [
        (["--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "taken")], "already exists"),
        (["--adapter", str(tmp_path / "other"), "--output", str(tmp_path / "o1")], "the model needs (4, 128)"),
        (["--adapter", str(tmp_path / "none"), "--output", str(tmp_path / "o2")], "no such adapter directory"),
    ]
    capsys.readouterr()
    for extra, fragment in cases:
        assert main(["merge", "--model", str(base), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "o1").exists() and not list(tmp_path.glob(".o1*"))
    with pytest.raises(NibbleError, match="float16"):
        merge_adapter(base, tmp_path / "adapter", tmp_path / "o3", dtype="float16")
