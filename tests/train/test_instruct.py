"""``nibble train --task instruct``: the loss is the masked cross-entropy of the responses (prompt tokens carry
none), the adapter is a CAUSAL_LM adapter PEFT applies with equal logits, resume is exact, and a .gguf base works."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import helpers
from gguf_files import CHATML, tiny_model, write_gguf
from nibble.cli.main import main
from nibble.data.instruct import IGNORE_INDEX, InstructData, encode_conversation
from nibble.io.tokenizer import load_tokenizer
from nibble.model import load_model
from nibble.model.adapter import load_adapted
from nibble.train.tasks.lm import lm_forward, lm_loss

CONVERSATIONS = [
    [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "A pear."}],
    [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Sky?"},
        {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "Grass, then?"},
        {"role": "assistant", "content": "Green"},
    ],
]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    base, hf = helpers.make_hf_checkpoint(root / "base", "qwen3")
    helpers.write_tokenizer(base, chat_template=CHATML)
    words = ["red", "blue", "green", "pink", "gold", "gray"]
    rows = [{"instruction": f"Repeat {w}.", "response": f"{w} {w} {w}"} for w in words] * 3
    rows += [{"messages": c} for c in CONVERSATIONS] * 2
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return SimpleNamespace(root=root, base=base, hf=hf, data=root / "train.jsonl")


def test_loss_is_the_cross_entropy_of_response_tokens_only(chat_model):
    model = load_model(chat_model.base)
    tokenizer = load_tokenizer(chat_model.base)
    encoded = [encode_conversation(tokenizer, c) for c in CONVERSATIONS]
    batch = InstructData.from_lists([e[0] for e in encoded], [e[1] for e in encoded]).collate([0, 1], helpers.PAD_ID)
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        ours = lm_loss(lm_forward(model, batch))
        logprobs = model(ids, batch["attention_mask"]).double().log_softmax(-1)  # [B, T, V]
    terms = [
        -logprobs[b, t, labels[b, t + 1]]
        for b in range(ids.shape[0])
        for t in range(ids.shape[1] - 1)
        if labels[b, t + 1] != IGNORE_INDEX
    ]
    assert len(terms) == len("A pear.<|im_end|>\n") + len("Blue<|im_end|>\nGreen<|im_end|>\n")  # a token per byte
    torch.testing.assert_close(ours.double(), torch.stack(terms).mean(), rtol=1e-6, atol=1e-6)

    # Through the hidden states: no gradient reaches a position whose next token is a prompt token or padding.
    hidden = model.hidden_states(ids, batch["attention_mask"]).detach().requires_grad_(True)
    stub = SimpleNamespace(hidden_states=lambda *_, **__: hidden, lm_head=model.lm_head)
    lm_loss(lm_forward(stub, batch)).backward()
    predicts_target = torch.zeros_like(labels, dtype=torch.bool)
    predicts_target[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    norms = hidden.grad.norm(dim=-1)  # [B, T]
    assert torch.all(norms[~predicts_target] == 0) and torch.all(norms[predicts_target] > 0)


def train_args(chat_model, out, *extra):
    args = ["train", "--task", "instruct", "--model", chat_model.base, "--data", chat_model.data, "--output", out]
    args += ["--max-steps", 8, "--lr", 1e-2, "--batch-size", 4, "--eval-every", 4, "--save-every", 4]
    return [str(a) for a in [*args, "--lora-dropout", 0, "--lora-targets", "q_proj,v_proj,down_proj", *extra]]


def test_cli_run_exports_a_causal_lm_adapter_peft_applies_and_resumes_exactly(chat_model, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(chat_model, out, "--method", "lora", "--eval-at-start")) == 0
    printed = capsys.readouterr().out
    assert "eval step 0: loss" in printed and "perplexity" in printed
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 4, 8] and evals[-1]["loss"] < evals[0]["loss"]
    assert all(r["perplexity"] == pytest.approx(math.exp(r["loss"])) for r in evals)
    assert {"loss.png", "perplexity.png"} <= {p.name for p in (out / "plots").iterdir()}
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["modules_to_save"] is None

    ours, _ = load_adapted(chat_model.base, out / "adapter")
    theirs = PeftModel.from_pretrained(helpers.make_hf_model("qwen3"), out / "adapter").eval()
    ids, mask = helpers.right_padded_batch([12, 7])
    with torch.no_grad():
        torch.testing.assert_close(
            ours(ids, mask)[mask.bool()],
            theirs(input_ids=ids, attention_mask=mask).logits[mask.bool()],
            atol=2e-5,
            rtol=0,
        )

    resumed = tmp_path / "resumed"
    assert main(train_args(chat_model, resumed, "--method", "lora", "--resume", out / "checkpoints" / "step-4")) == 0
    want, got = (
        load_file(out / "adapter" / "adapter_model.safetensors"),
        load_file(resumed / "adapter" / "adapter_model.safetensors"),
    )
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_qlora_with_packing_on_a_gguf_base_then_generate(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    gguf = write_gguf(tmp_path / "tiny.gguf", tiny_model("llama", tie_word_embeddings=True))
    rows = [{"instruction": "Say hello.", "response": "hello there"}] * 6
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--task", "instruct", "--model", gguf, "--data", tmp_path / "d.jsonl", "--output", tmp_path / "o"]
    args += ["--packing", "--max-seq-len", 32, "--max-steps", 3, "--batch-size", 2, "--val-split", 0, "--lr", 1e-2]
    assert main([str(a) for a in args]) == 0
    assert "packed sequences" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "adapter" / "nibble.json").read_text())["quant"]["format"] == "nf4"
    adapter = load_file(tmp_path / "o" / "adapter" / "adapter_model.safetensors")
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_B" in k)  # trained
    generate = ["generate", "--model", gguf, "--adapter", tmp_path / "o" / "adapter", "--prompt", "Say hello."]
    assert main([str(a) for a in [*generate, "--max-new-tokens", 4]]) == 0
    shutil.rmtree(tmp_path / "cache")
