"""``nibble generate`` and its Python API: greedy text equals transformers' (and PEFT's) greedy generate, the chat
template is applied as transformers applies it, tokens stream out as they come, and bad adapters are one line."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import helpers
from gguf_files import CHATML
from nibble.cli.main import main
from nibble.errors import NibbleError
from nibble.io.tokenizer import load_tokenizer
from nibble.model.generate import TextStream, generate_text, load_generator, prompt_ids
from peft_adapters import save_peft_adapter


class Recorder:
    """Stands in for sys.stdout and keeps each write separately (to see streaming)."""

    def __init__(self):
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def run_cli(monkeypatch, *args) -> Recorder:
    """``nibble generate`` in fp32, the dtype of the transformers references it is compared with."""
    out = Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["generate", "--dtype", "float32", *map(str, args)]) == 0
    monkeypatch.undo()
    return out


def hf_greedy(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """transformers' greedy continuation of ``ids``, decoded without special tokens."""
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    return tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


@pytest.mark.cpu_bf16
@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_plain_prompt_streams_transformers_greedy_text(shared_checkpoint, monkeypatch, family):
    path, hf = shared_checkpoint(family)
    reference = AutoTokenizer.from_pretrained(path)
    prompt = "Once upon a time"
    want = hf_greedy(hf, reference, reference(prompt).input_ids, 24)
    out = run_cli(monkeypatch, "--model", path, "--prompt", prompt, "--no-chat", "--max-new-tokens", 24)
    assert "".join(out.writes) == want + "\n"
    assert len([w for w in out.writes if w]) > 3  # written piece by piece, not all at the end


def test_chat_template_is_applied_like_transformers(hf_checkpoint, monkeypatch):
    path, hf = hf_checkpoint("llama", tie_word_embeddings=True)
    helpers.write_tokenizer(path, chat_template=CHATML)
    reference = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    text = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = reference(text, add_special_tokens=False).input_ids
    assert prompt_ids(load_tokenizer(path), "Name a colour.", system="Be brief.") == ids
    want = hf_greedy(hf, reference, ids, 16)
    args = ["--model", path, "--prompt", "Name a colour.", "--system", "Be brief.", "--max-new-tokens", 16]
    assert "".join(run_cli(monkeypatch, *args).writes) == want + "\n"
    plain = "".join(run_cli(monkeypatch, *args[:4], "--no-chat", *args[6:]).writes)
    assert plain == hf_greedy(hf, reference, reference("Name a colour.").input_ids, 16) + "\n"


@pytest.mark.cpu_bf16
def test_adapter_output_equals_peft_generate(shared_checkpoint, tmp_path, monkeypatch):
    path, hf = shared_checkpoint("qwen3")
    peft_model = save_peft_adapter(hf, tmp_path / "adapter", targets=("q_proj", "v_proj", "gate_proj"))
    reference = AutoTokenizer.from_pretrained(path)
    ids = reference("The adapter says").input_ids
    want = hf_greedy(peft_model, reference, ids, 20)
    assert want != hf_greedy(hf, reference, ids, 20)
    args = ["--model", path, "--adapter", tmp_path / "adapter", "--prompt", "The adapter says", "--no-chat"]
    assert "".join(run_cli(monkeypatch, *args, "--max-new-tokens", 20).writes) == want + "\n"


def test_python_api_streams_samples_reproducibly_and_holds_back_partial_characters(shared_checkpoint, capsys):
    path, _ = shared_checkpoint("qwen3")
    model, tokenizer = load_generator(path)
    pieces: list[str] = []
    text = generate_text(model, tokenizer, "abc", chat=False, max_new_tokens=12, on_text=pieces.append)
    assert "".join(pieces) == text and len(pieces) > 1
    # the README's streaming callback prints the text as it is, not a piece per line
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    callback = eval(re.search(r"on_text=(lambda piece: print\(.*?\)),", readme).group(1))  # noqa: S307
    capsys.readouterr()
    assert generate_text(model, tokenizer, "abc", chat=False, max_new_tokens=12, on_text=callback) == text
    assert capsys.readouterr().out == text
    sampled = [
        generate_text(model, tokenizer, "abc", max_new_tokens=12, temperature=1.0, top_k=20, seed=5) for _ in "ab"
    ]
    assert sampled[0] == sampled[1]
    stream = TextStream(tokenizer)
    assert [stream.push(t) for t in (0x61, 0xC3, 0xA9, helpers.EOS_ID)] == ["a", "", "é", ""]
    with pytest.raises(NibbleError, match="no chat_template"):
        prompt_ids(tokenizer, "hi", chat=True)


def test_classifier_adapter_is_rejected_in_one_line(shared_checkpoint, tmp_path, capsys):
    path, _ = shared_checkpoint("qwen3")
    _, classifier = shared_checkpoint("qwen3", num_labels=2)
    save_peft_adapter(classifier, tmp_path / "cls")
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--adapter", str(tmp_path / "cls"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "SEQ_CLS adapter" in err and "CAUSAL_LM" in err


@pytest.mark.cpu_bf16
def test_a_oneDNN_failure_nothing_can_fall_back_from_is_one_line(shared_checkpoint, monkeypatch, capsys):
    # Attention is not a matmul kernels.linear can move to fp32 units: the CLI says what to change.
    path, _ = shared_checkpoint("qwen3")

    def attention(*args, **kwargs):
        raise RuntimeError("could not create a primitive descriptor for a matmul primitive\nmore detail")

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", attention)
    capsys.readouterr()
    assert main(["generate", "--model", str(path), "--dtype", "bfloat16", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: the CPU's low-precision kernels (oneDNN) failed: could not create a primitive")
    assert err[-1].endswith("rerun with --dtype float32") and "Traceback" not in "\n".join(err)
