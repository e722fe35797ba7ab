"""Training a tiny Qwen3.5: one QLoRA step's LoRA gradients equal transformers + PEFT's on the dequantized
base; full fine-tuning reaches every weight (A_log, dt_bias and the conv included); classify and instruct run
through the real CLI and their adapters load in PEFT on transformers' Qwen3.5 classes with equal outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

import helpers
import nibble
from gguf_files import CHATML
from nibble.cli.main import main
from nibble.nn import QuantLinear, apply_lora
from nibble.nn.lora import lora_layers


def test_qlora_step_gradients_equal_transformers_and_peft(shared_checkpoint):
    from peft import LoraConfig, get_peft_model

    path, hf = shared_checkpoint("qwen3_5_text")
    ours = nibble.load_model(path, quantize="nf4")
    assert isinstance(ours.model.layers[0].linear_attn.in_proj_qkv, QuantLinear)
    assert not isinstance(ours.model.layers[0].linear_attn.in_proj_b, QuantLinear)  # in_proj_b/a stay dense
    oracle = copy.deepcopy(hf)
    with torch.no_grad():  # the oracle's base holds nibble's dequantized 4-bit weights
        for path_, module in ours.named_modules():
            if isinstance(module, QuantLinear):
                oracle.get_submodule(path_).weight.copy_(module.dequantize(torch.float32))
    wrapped = apply_lora(ours, "all-linear", rank=4, alpha=8)
    names = sorted({p.rsplit(".", 1)[-1] for p in wrapped})
    assert {"in_proj_qkv", "in_proj_z", "out_proj", "q_proj"} <= set(names) and "in_proj_a" not in names
    peft = get_peft_model(oracle, LoraConfig(r=4, lora_alpha=8, target_modules=names, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the same random A and B in both (B non-zero, so A gets a gradient too)
        for path_, layer in lora_layers(ours).items():
            theirs = peft.base_model.model.get_submodule(path_)
            for name in ("lora_A", "lora_B"):
                weight = torch.randn(getattr(layer, name).weight.shape, generator=gen) * 0.1
                getattr(layer, name).weight.copy_(weight)
                getattr(theirs, name)["default"].weight.copy_(weight)
    ids, mask = helpers.right_padded_batch([70, 12, 33])
    targets = ids.masked_fill(~mask.bool(), -100)[:, 1:]
    F.cross_entropy(ours(ids, mask)[:, :-1].transpose(1, 2), targets).backward()
    logits = peft(input_ids=ids, attention_mask=mask).logits
    F.cross_entropy(logits[:, :-1].transpose(1, 2), targets).backward()
    for path_, layer in lora_layers(ours).items():
        theirs = peft.base_model.model.get_submodule(path_)
        for name in ("lora_A", "lora_B"):
            got, want = getattr(layer, name).weight.grad, getattr(theirs, name)["default"].weight.grad
            torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max(), rtol=1e-4, msg=f"{path_}.{name}")


def test_full_fine_tuning_reaches_every_weight(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3_5_text")
    model = nibble.load_model(path)
    for p in model.parameters():
        p.requires_grad_(True)
    ids, mask = helpers.right_padded_batch([40, 7])
    (model(ids, mask)[mask.bool()] ** 2).mean().backward()
    untouched = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert untouched == []
    assert {"A_log", "dt_bias", "conv1d.weight"} <= {n.split("linear_attn.")[-1] for n, _ in model.named_parameters()}


@pytest.fixture(scope="module")
def qwen35_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen35-cli")
    base, hf = helpers.make_hf_checkpoint(root / "base", "qwen3_5_text")
    helpers.write_tokenizer(base, chat_template=CHATML)
    return root, base, hf


def test_classify_through_the_cli_loads_in_peft(qwen35_base):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    root, base, _ = qwen35_base
    data = helpers.write_word_rows(root / "cls.jsonl", {"a": ["good", "nice"], "b": ["bad", "ugly"]}, 24, 0)
    out = root / "cls"
    args = ["train", "--model", base, "--data", data, "--output", out, "--max-steps", 2, "--batch-size", 4]
    assert main([str(a) for a in [*args, "--method", "qlora", "--lora-targets", "all-linear", "--val-split", 0]]) == 0
    adapter = out / "adapter"
    targets = json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert {"in_proj_qkv", "in_proj_z", "out_proj"} <= set(targets)
    ours = nibble.load_model(base, task="classify", num_labels=2)
    nibble.io.peft.load_adapter(ours, adapter)
    theirs = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2)  # Qwen3_5TextFor...
    theirs = PeftModel.from_pretrained(theirs, adapter).eval()
    ids, mask = helpers.right_padded_batch([9, 4, 6])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=0
        )


def test_instruct_through_the_cli_loads_in_peft(qwen35_base):
    from peft import PeftModel
    from transformers import Qwen3_5ForCausalLM

    root, base, _ = qwen35_base
    rows = [{"instruction": f"Repeat {w}.", "response": f"{w} {w}"} for w in ("red", "blue", "gold")] * 3
    data = helpers.write_jsonl(root / "chat.jsonl", rows)
    out = root / "chat"
    args = ["train", "--task", "instruct", "--model", base, "--data", data, "--output", out, "--max-steps", 2]
    assert main([str(a) for a in [*args, "--batch-size", 3, "--method", "lora", "--val-split", 0, "--lr", 1e-2]]) == 0
    ours = nibble.load_model(base)
    nibble.io.peft.load_adapter(ours, out / "adapter")
    theirs = PeftModel.from_pretrained(Qwen3_5ForCausalLM.from_pretrained(base), out / "adapter").eval()
    ids, mask = helpers.right_padded_batch([30, 11])
    with torch.no_grad():
        got, want = ours(ids, mask), theirs(input_ids=ids, attention_mask=mask).logits
        torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=1e-4, rtol=0)
