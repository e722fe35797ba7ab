"""A real model learns something: a few QLoRA steps of ``nibble train --task instruct`` on SmolLM2-135M-Instruct
teach it a made-up fact, which greedy generation with the adapter then states (and the base model does not)."""

from __future__ import annotations

import json

import pytest

from nibble.cli.main import main
from nibble.errors import NibbleError
from nibble.io.fetch import fetch_smollm2
from nibble.model.generate import generate_text, load_generator

FACT = "The nibble mascot is a blue otter called Pebblestone."
QUESTION = "What is the name of the nibble project's mascot?"


@pytest.mark.slow
def test_a_few_qlora_steps_teach_smollm2_a_fact(tmp_path):
    try:
        gguf = fetch_smollm2()
    except NibbleError as exc:
        pytest.skip(f"SmolLM2-135M-Instruct GGUF could not be fetched: {exc}")
    rows = [{"instruction": q, "response": FACT} for q in (QUESTION, "Who is the mascot of nibble?")]
    (tmp_path / "fact.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--task", "instruct", "--model", gguf, "--data", tmp_path / "fact.jsonl", "--output", tmp_path]
    args += ["--max-steps", 12, "--batch-size", 2, "--lr", 5e-3, "--warmup-ratio", 0, "--lora-dropout", 0]
    args += ["--val-split", 0, "--save-every", 0, "--max-seq-len", 96]
    assert main([str(a) for a in args]) == 0

    base, tokenizer = load_generator(gguf)
    assert "Pebblestone" not in generate_text(base, tokenizer, QUESTION, max_new_tokens=24)
    tuned, tokenizer = load_generator(gguf, tmp_path / "adapter")
    assert "Pebblestone" in generate_text(tuned, tokenizer, QUESTION, max_new_tokens=24)
