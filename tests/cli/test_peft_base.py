"""An adapter trained on a .gguf model names a base PEFT can load: ``AutoPeftModelForCausalLM.from_pretrained(adapter)``
works on its own and gives nibble's logits; nibble.json keeps the .gguf file the run started from."""

from __future__ import annotations

import json

import torch

import helpers
from gguf_files import tiny_model, write_gguf
from nibble.cli.main import main
from nibble.model.adapter import load_adapted


def test_auto_peft_model_loads_an_adapter_trained_on_a_gguf_file(tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    gguf = write_gguf(tmp_path / "tiny.gguf", tiny_model("qwen3"))
    rows = [{"instruction": f"Say {w}.", "response": f"{w} {w}"} for w in ("red", "blue", "green")] * 2
    helpers.write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    args = ["train", "--task", "instruct", "--model", gguf, "--data", tmp_path / "d.jsonl", "--output", out]
    args += ["--method", "lora", "--max-steps", 2, "--batch-size", 2, "--val-split", 0, "--lr", 1e-2]
    assert main([str(a) for a in args]) == 0

    adapter = out / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base.startswith(str(tmp_path / "cache" / "converted")), base  # the HF directory of the conversion
    assert json.loads((adapter / "nibble.json").read_text())["base_model"] == str(gguf)

    theirs = AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=torch.float32).eval()
    ours, _ = load_adapted(gguf, adapter)
    ids, mask = helpers.right_padded_batch([9, 5], vocab=200)
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        torch.testing.assert_close(ours(ids, mask)[mask.bool()], want, atol=2e-5, rtol=0)
