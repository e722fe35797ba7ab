"""``nibble export`` against independent readers: the gguf package's reader, transformers' GGUF loader, and the
adapter merged by hand.

Tiny transformers models (Llama with Llama 3 RoPE scaling, Qwen2 with q/k/v biases and its own head, Qwen3
with QK-norm) are exported and read back; the source model is the reference for weights, logits, token ids
and the rendered chat.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import helpers
import nibble
from gguf_files import (
    CHATML,
    CORPUS,
    LLAMA3_ROPE,
    byte_level_bpe,
    gguf_name,
    save_tiny,
    tiny_model,
    write_sentencepiece_gguf,
)
from nibble.cli.main import main
from nibble.data.instruct import read_instruct
from nibble.data.records import stratified_split
from nibble.errors import NibbleError
from nibble.io.gguf import GGUFFile, GGUFTensor, unpermute_rotary, write_gguf
from nibble.io.peft import adapter_config, save_adapter
from nibble.io.tokenizer import load_tokenizer
from nibble.model import load_model
from nibble.model.generate import generate
from nibble.nn import apply_lora
from nibble.train.gguf_export import eval_texts, export_gguf, report_path

VARIANTS = {
    "llama": dict(
        model_type="llama",
        tie_word_embeddings=True,
        rope_parameters={**LLAMA3_ROPE, "original_max_position_embeddings": 64},  # scaled within 256 positions
    ),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=False),
    # transformers reads no head size from a qwen3 GGUF and takes Qwen3's 128
    "qwen3": dict(
        model_type="qwen3", tie_word_embeddings=True, head_dim=128, num_attention_heads=2, num_key_value_heads=1
    ),
}
TEXTS = [
    "Hello world",
    "the quick brown fox jumps over the lazy dog",
    "  spaces,\ttabs\n\nand lines  ",
    "naïve café déjà vu — Grüße 東京 🙂",
    "numbers 1234567 3.14159?!",
    "<|im_start|>user\nhi<|im_end|>\n",
]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Per variant: (HF directory with tokenizer and chat template, the transformers model), built once."""
    built = {}

    def get(variant: str):
        if variant not in built:
            overrides = dict(VARIANTS[variant])
            model = tiny_model(overrides.pop("model_type"), **overrides)
            built[variant] = (save_tiny(tmp_path_factory.mktemp(variant) / "model", model), model)
        return built[variant]

    return get


def read_back(path: Path, config) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file by its GGUF name, dequantized by the gguf package, llama q/k rows in HF order."""
    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape.tolist())])
        tensor = torch.from_numpy(np.array(values, dtype=np.float32))
        match = re.fullmatch(r"blk\.\d+\.attn_([qk])\.(weight|bias)", t.name)
        if arch == "llama" and match:
            heads = config.num_attention_heads if match.group(1) == "q" else config.num_key_value_heads
            tensor = unpermute_rotary(tensor, heads)
        out[t.name] = tensor
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f16_export_reads_back_in_both_readers(sources, variant, tmp_path):
    source, hf = sources(variant)
    out = tmp_path / "model.gguf"
    report = export_gguf(source, out, quant="f16", eval_tokens=0, log=lambda line: None)
    assert report["architecture"] == variant
    # the gguf package's reader: every weight is the source's rounded to f16 (norms and biases stay f32)
    tensors = read_back(out, hf.config)
    expected = {gguf_name(n): w for n, w in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        del expected["output.weight"]
    rope = "rope_freqs.weight" in tensors
    assert set(tensors) - {"rope_freqs.weight"} == set(expected) and rope == (variant == "llama")
    for name, want in expected.items():
        rounded = want if want.dim() == 1 else want.half().float()
        torch.testing.assert_close(tensors[name], rounded, rtol=0, atol=0, msg=name)
    # transformers' GGUF loader, a second reader: the logits of the source model within f16's rounding
    if variant != "llama":  # transformers ignores rope_freqs, so it cannot read Llama 3 scaling from a GGUF
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
        ids = torch.randint(5, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want, got = hf(ids).logits, theirs(ids).logits
        assert float((got - want).norm() / want.norm()) <= 1e-2
    # nibble reading the file back computes the source model's logits too (Llama 3 RoPE factors included)
    ours = load_model(out, quantize="gguf")
    ids = torch.randint(5, hf.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert float((got - want).norm() / want.norm()) <= 1e-2


def test_tokenizer_and_chat_template_survive(sources, tmp_path):
    source, _ = sources("qwen2")
    out = tmp_path / "model.gguf"
    export_gguf(source, out, quant="f16", eval_tokens=0, log=lambda line: None)
    original = load_tokenizer(source)
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    ours = GGUFFile(out)
    ours_backend = ours.tokenizer()
    for text in [*TEXTS, *CORPUS[:5]]:
        want = original.encode(text)
        assert theirs(text).input_ids == want, text
        assert ours_backend.encode(text).ids == want, text
    rendered = original.apply_chat_template(MESSAGES, add_generation_prompt=True)
    assert theirs.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == rendered
    assert ours.meta("tokenizer.chat_template") == CHATML
    assert (ours.meta("tokenizer.ggml.bos_token_id"), ours.meta("tokenizer.ggml.eos_token_id")) == (1, 2)
    assert ours.meta("tokenizer.ggml.padding_token_id") == 0
    assert ours.meta("tokenizer.ggml.pre") == "gpt-2" and ours.meta("tokenizer.ggml.add_bos_token") is False


def test_sentencepiece_tokenizer_survives(tmp_path):
    """A llama-type vocabulary (SentencePiece BPE with byte fallback): tokens, scores that order the merges as
    tokenizer.json does, byte and control token types, BOS added."""
    source = tmp_path / "spm"
    tokenizer_file = write_sentencepiece_gguf(tmp_path / "tokenizer.gguf", with_merges=False)
    GGUFFile(tokenizer_file).save_tokenizer(source)
    original = load_tokenizer(source)
    helpers.make_hf_model("llama", vocab_size=len(original), bos_token_id=1, eos_token_id=2).save_pretrained(source)
    out = tmp_path / "export" / "m.gguf"
    export_gguf(source, out, quant="f16", eval_tokens=0, log=lambda line: None)
    ours = GGUFFile(out)
    assert ours.meta("tokenizer.ggml.model") == "llama" and ours.meta("tokenizer.ggml.add_bos_token") is True
    types = ours.meta("tokenizer.ggml.token_type")
    assert types[:4] == [2, 3, 3, 6] and types.count(6) == 256  # <unk>, <s>, </s>, then the byte tokens
    theirs = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    backend = ours.tokenizer()
    for text in [*TEXTS, *CORPUS[:5], " x", "  y"]:
        want = original.encode(text)
        assert backend.encode(text).ids == want, text
        assert theirs(text).input_ids == want, text


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A one-layer Llama with rows of 256 values (so the K-quants apply), trained until it has memorized the
    test corpus: its greedy continuations win by wide margins, as a real model's do (a random model's
    near-uniform logits would make greedy tokens a coin toss under any rounding). Returns (directory, corpus ids)."""
    model = tiny_model(
        "llama",
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        init_std=0.02,
    )
    sequences = [byte_level_bpe().encode(text).ids for text in CORPUS[:5]]
    ids = torch.zeros(len(sequences), max(map(len, sequences)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), 1
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    for _ in range(30):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss.detach()) < 0.05
    return save_tiny(tmp_path_factory.mktemp("trained") / "model", model.eval()), sequences


@pytest.mark.parametrize("quant", ["q8_0", "q4_k", "q4_0"])
def test_quantized_export_keeps_greedy_tokens(trained, quant, tmp_path):
    source, sequences = trained
    out = tmp_path / f"{quant}.gguf"
    report = export_gguf(source, out, quant=quant, eval_tokens=512, log=lambda line: None)
    wanted = quant.upper()
    assert set(report["types"]) == ({"F32", wanted, "Q6_K"} if quant.startswith("q4") else {"F32", wanted})
    assert report["tensors"]["output.weight"] == ("Q6_K" if quant.startswith("q4") else wanted)
    float_model, exported = load_model(source), load_model(out, quantize="gguf")
    for seq in sequences:
        want = generate(float_model, seq[:4], max_new_tokens=10, eos_token_id=[])
        assert generate(exported, seq[:4], max_new_tokens=10, eos_token_id=[]) == want
    ppl = report["perplexity"]
    assert ppl["text"].startswith("nibble's sample text") and ppl["tokens"] >= 500
    if quant == "q8_0":
        assert abs(ppl["change"]) < 0.03
    saved = json.loads(report_path(out).read_text())
    assert saved["perplexity"] == ppl and saved["bytes"] == out.stat().st_size


def test_fallback_types_for_short_rows(sources, tmp_path):
    """Rows of 64 values take no 256-block type: q4_k falls back to q5_0, the head's q6_k to q8_0."""
    source, _ = sources("qwen2")
    report = export_gguf(source, tmp_path / "m.gguf", quant="q4_k", eval_tokens=0, log=lambda line: None)
    assert report["tensors"]["blk.0.attn_q.weight"] == "Q5_0"
    assert report["tensors"]["output.weight"] == "Q8_0"
    assert report["tensors"]["blk.0.attn_q.bias"] == "F32"
    assert "blk.0.attn_q.weight" in report["fallbacks"]


def make_adapter(source: Path, directory: Path, *, rank: int = 4, alpha: float = 8.0, use_rslora: bool = False):
    """A LoRA adapter on all seven projections with random non-zero A and B, saved in PEFT's layout."""
    model = load_model(source)
    targets = apply_lora(model, "all-linear", rank=rank, alpha=alpha, use_rslora=use_rslora)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    config = adapter_config(
        base_model=str(source),
        targets=sorted({t.rsplit(".", 1)[1] for t in targets}),
        rank=rank,
        alpha=alpha,
        dropout=0.0,
        use_rslora=use_rslora,
        task="causal_lm",
    )
    save_adapter(model, directory, config)
    return directory


@pytest.mark.parametrize("use_rslora", [False, True])
def test_adapter_gguf_merged_by_hand_equals_merged_export(sources, tmp_path, use_rslora):
    source, _ = sources("llama")  # llama: B's rows take the q/k interleave
    adapter = make_adapter(source, tmp_path / "adapter", use_rslora=use_rslora)
    kwargs = dict(quant="f32", eval_tokens=0, log=lambda line: None)
    export_gguf(source, tmp_path / "base.gguf", **kwargs)
    export_gguf(source, tmp_path / "merged.gguf", adapter=adapter, **kwargs)
    report = export_gguf(source, tmp_path / "lora.gguf", adapter=adapter, adapter_only=True, **kwargs)
    assert report["architecture"] == "llama"

    def raw(path: Path) -> dict[str, np.ndarray]:
        reader = gguf.GGUFReader(path)
        return {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape.tolist())]) for t in reader.tensors}

    base, merged, lora = raw(tmp_path / "base.gguf"), raw(tmp_path / "merged.gguf"), raw(tmp_path / "lora.gguf")
    meta = gguf.GGUFReader(tmp_path / "lora.gguf").fields
    assert meta["general.type"].contents() == "adapter" and meta["adapter.type"].contents() == "lora"
    alpha = meta["adapter.lora.alpha"].contents()
    rank = 4
    assert alpha == pytest.approx(8.0 * (rank**0.5 if use_rslora else 1.0))
    pairs = sorted(name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a"))
    assert len(pairs) == 7 * 2  # seven projections in each of the two layers
    for name in pairs:
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        assert a.shape == (rank, base[name].shape[1]) and b.shape == (base[name].shape[0], rank)
        by_hand = base[name] + (b @ a) * (alpha / rank)
        np.testing.assert_allclose(by_hand, merged[name], rtol=0, atol=2e-6, err_msg=name)
    for name in set(base) - set(pairs):  # the rest is untouched
        np.testing.assert_array_equal(base[name], merged[name])


def test_classification_adapter_is_refused(hf_checkpoint, tmp_path, capsys):
    source, _ = hf_checkpoint("qwen3")
    model = load_model(source, task="classify", num_labels=3)
    apply_lora(model, "q_proj,v_proj", rank=2, alpha=4)
    config = adapter_config(
        base_model=None, targets=["q_proj", "v_proj"], rank=2, alpha=4, dropout=0.0, use_rslora=False, task="classify"
    )
    save_adapter(model, tmp_path / "adapter", config)
    out = tmp_path / "m.gguf"
    argv = ["export", "--model", str(source), "--adapter", str(tmp_path / "adapter"), "--output", str(out)]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "classification adapter" in err and "causal language models" in err
    assert "\n" not in err and not out.exists()


def test_cli_export_prints_and_saves_the_report(sources, tmp_path, capsys):
    source, _ = sources("qwen3")
    out = tmp_path / "m.gguf"
    assert main(["export", "--model", str(source), "--output", str(out), "--quant", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert "Q8_0" in printed and "perplexity on nibble's sample text" in printed and str(report_path(out)) in printed
    # an existing file is kept unless --overwrite
    assert main(["export", "--model", str(source), "--output", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_write_is_atomic(tmp_path):
    def broken() -> torch.Tensor:
        raise NibbleError("boom")

    tensors = [GGUFTensor("a.weight", (4, 32), "Q8_0", lambda: torch.ones(4, 32)), GGUFTensor("b", (4,), "F32", broken)]
    with pytest.raises(NibbleError, match="boom"):
        write_gguf(tmp_path / "x.gguf", "llama", {"general.name": "x"}, tensors)
    assert list(tmp_path.iterdir()) == []


def test_report_text_prefers_given_data_then_the_runs_validation_rows(sources, tmp_path):
    source, _ = sources("qwen2")
    tokenizer = load_tokenizer(source)

    def batch(data) -> dict[str, torch.Tensor]:
        return data.collate(range(len(data)), 0)

    rows = [{"instruction": f"Say {w}.", "response": f"{w}!"} for w in ["a", "b", "c", "d", "e", "f", "g", "h"]]
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(f"task: instruct\ndata: {data}\nval_split: 0.25\nseed: 3\n")
    texts, where = eval_texts(tokenizer, None, run / "adapter", 10_000)
    _, val = stratified_split([0] * len(rows), 0.25, 3)
    assert "validation split" in where and len(texts) == len(val) == 2
    want = batch(read_instruct(data, tokenizer).subset(val))
    assert all(torch.equal(batch(texts)[key], want[key]) for key in want)
    plain = tmp_path / "notes.txt"
    plain.write_text("plain words " * 400)
    texts, where = eval_texts(tokenizer, plain, run / "adapter", 300)
    got = batch(texts)
    assert where == str(plain) and torch.equal(
        got["labels"], got["input_ids"].masked_fill(got["attention_mask"] == 0, -100)
    )
    assert 300 <= int(got["attention_mask"].sum()) < 300 + 512
    texts, where = eval_texts(tokenizer, None, None, 10_000)
    assert where.startswith("nibble's sample text") and int(batch(texts)["attention_mask"].sum()) > 1000


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    """A real short write: a file-size limit (RLIMIT_FSIZE) below the file's size, in a process of its own."""
    script = f"""
import resource, signal, sys, torch
from nibble.errors import NibbleError
from nibble.io.gguf import GGUFTensor, write_gguf
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
tensors = [GGUFTensor("a.weight", (256, 256), "F32", lambda: torch.ones(256, 256))]
try:
    write_gguf({str(tmp_path / "x.gguf")!r}, "llama", {{"general.name": "x"}}, tensors)
except NibbleError as exc:
    print(exc)
    sys.exit(2)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(nibble.__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and result.stderr == "", result.stderr[-2000:]
    assert result.stdout.count("\n") == 1 and result.stdout.startswith(f"{tmp_path}: cannot write (")
    assert "needed); check the directory or write elsewhere" in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_a_runs_validation_data_that_is_gone_is_one_line_not_the_sample_text(sources, tmp_path):
    tokenizer = load_tokenizer(sources("qwen2")[0])
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    for key in ("val_data", "data"):
        (run / "config.yaml").write_text(f"task: instruct\n{key}: {tmp_path / 'moved.jsonl'}\n")
        with pytest.raises(NibbleError, match=rf"moved.jsonl: the run's {key} \(recorded in .*config.yaml\) is gone"):
            eval_texts(tokenizer, None, run / "adapter", 1000)
