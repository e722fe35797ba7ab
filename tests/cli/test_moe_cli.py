"""Qwen3-MoE, Qwen3-Next and Qwen3.5-MoE through the real CLI (QLoRA): classify with LoRA on attention + experts and
a trained router reloads in PEFT with equal probabilities, merges into a checkpoint transformers loads; instruct
trains the experts and generates greedily what transformers generates from the merged model."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import helpers
from gguf_files import CHATML
from nibble.cli.main import main
from nibble.nn.lora import DELTANET_PROJECTIONS, PROJECTIONS
from nibble.quant import nf4


@pytest.fixture(scope="module", params=["qwen3_moe", "qwen3_next", "qwen3_5_moe_text"])
def moe(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("moe-cli")
    base, hf = helpers.make_hf_checkpoint(root / "base", request.param)
    helpers.write_tokenizer(base, chat_template=CHATML)
    words = {"neg": ["bad", "awful", "poor"], "pos": ["good", "great", "fine"]}
    train = helpers.write_word_rows(root / "train.jsonl", words, 48, seed=0)
    val = helpers.write_word_rows(root / "val.jsonl", words, 12, seed=1)
    rows = [{"instruction": f"Repeat {w}.", "response": f"{w} {w}"} for w in ["red", "blue", "gold"]] * 4
    chat = helpers.write_jsonl(root / "chat.jsonl", rows)
    sparse = sum(hasattr(layer.mlp, "experts") for layer in hf.model.layers)
    return SimpleNamespace(root=root, base=base, train=train, val=val, chat=chat, family=request.param, sparse=sparse)


def _nf4_hf(model):
    """A transformers model whose projections (attention, DeltaNet, SwiGLU, shared expert) and experts hold their NF4
    round trip (what nibble's QLoRA base holds)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            module = name.removesuffix(".weight").rsplit(".", 1)[-1]
            if module in (*PROJECTIONS, *DELTANET_PROJECTIONS) or name.endswith(
                ("experts.gate_up_proj", "experts.down_proj")
            ):
                p.copy_(nf4.quantize(p).dequantize(torch.float32))
    return model


def test_classify_qlora_on_experts_and_router(moe, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if moe.family == "qwen3_5_moe_text":
        pytest.skip("transformers 5.23 has no Qwen3.5-MoE sequence-classification class to compare with")
    out = tmp_path / "out"
    args = ["train", "--model", moe.base, "--data", moe.train, "--val-data", moe.val, "--output", out,
            "--lora-targets", "all-linear", "--train-router", "--router-aux-loss", "0.01", "--max-steps", "6",
            "--batch-size", "8", "--lr", "5e-3", "--log-every", "2", "--dtype", "float32"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    printed = capsys.readouterr().out
    assert "trainable by part: attention" in printed and "experts" in printed
    assert f"router {moe.sparse * 4 * 64:,}" in printed  # sparse layers x 4 experts x 64 hidden
    train_records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["router_aux_loss"] > 0 for r in train_records if r["kind"] == "train")
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert config["modules_to_save"] == ["score", "mlp.gate"]

    preds = tmp_path / "pred.jsonl"
    assert main(["predict", "--model", str(moe.base), "--adapter", str(adapter), "--data", str(moe.val),
                 "--output", str(preds)]) == 0  # fmt: skip
    ours = torch.tensor([list(json.loads(line)["probs"].values()) for line in preds.read_text().splitlines()])
    texts = [json.loads(line)["text"] for line in moe.val.read_text().splitlines()]
    hf = _nf4_hf(AutoModelForSequenceClassification.from_pretrained(moe.base, num_labels=2))
    peft = PeftModel.from_pretrained(hf, adapter).eval()
    batch = AutoTokenizer.from_pretrained(moe.base)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = peft(**batch).logits.softmax(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(moe.base), "--adapter", str(adapter), "--output", str(merged)]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits.softmax(-1), theirs, rtol=1e-4, atol=1e-5)


def test_instruct_on_experts_generates_what_transformers_generates_merged(moe, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from nibble.io.tokenizer import load_tokenizer
    from nibble.model.generate import prompt_ids

    out = tmp_path / "out"
    args = ["train", "--task", "instruct", "--model", moe.base, "--data", moe.chat, "--output", out,
            "--dtype", "float32", "--lora-targets", "experts", "--max-steps", "4", "--batch-size", "4",
            "--lr", "0.01"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    capsys.readouterr()
    adapter = out / "adapter"
    gen = ["generate", "--model", moe.base, "--adapter", adapter, "--prompt", "Repeat red.", "--max-new-tokens", "8",
           "--dtype", "float32"]  # fmt: skip
    assert main([str(a) for a in gen]) == 0
    generated = capsys.readouterr().out
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(moe.base), "--adapter", str(adapter), "--output", str(merged)]) == 0
    hf = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = prompt_ids(load_tokenizer(moe.base), "Repeat red.")
    tokens = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8, eos_token_id=[])[0, len(ids) :]
    text = load_tokenizer(moe.base).decode(tokens.tolist())
    assert text.strip() and text.strip() in generated


@pytest.mark.cpu_bf16
def test_a_trained_router_keeps_fp32_weights_and_trains_in_bf16(moe, tmp_path):
    """Under bf16 compute the router's fp32 master weights meet bf16 hidden states (as autocast would cast them)."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    args = ["train", "--model", moe.base, "--data", moe.train, "--output", out, "--dtype", "bfloat16",
            "--lora-targets", "q_proj,v_proj", "--train-router", "--max-steps", "2", "--batch-size", "4"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    routers = [t for name, t in saved.items() if name.endswith("mlp.gate.weight")]
    assert len(routers) == moe.sparse and all(t.dtype == torch.float32 and t.isfinite().all() for t in routers)
