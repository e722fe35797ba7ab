"""``nibble cache``: what nibble keeps on disk (GGUF conversions, 4-bit bases, token caches), listed with sizes and
cleared by kind, touching nothing else; a .gguf conversion says where it went and how big; export caches nothing."""

from __future__ import annotations

import re

import pytest

import helpers
import nibble
from gguf_files import tiny_model, write_gguf
from nibble.cli.main import main
from nibble.data import load_classification
from nibble.io.files import format_size, tree_bytes
from nibble.io.tokenizer import load_tokenizer


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("NIBBLE_TOKEN_CACHE", raising=False)  # token caches under <cache>/tokens
    return tmp_path / "cache"


def test_cache_lists_sizes_and_clears_by_kind_and_leaves_other_files(cache, tmp_path, capsys):
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model("qwen3"))
    nibble.load_model(path)
    (converted,) = (cache / "converted").iterdir()
    note = capsys.readouterr().err.strip().splitlines()[-1]
    assert note == (
        f"cache: converted tiny.gguf ({format_size(path.stat().st_size)}) into {converted} "
        f"({format_size(tree_bytes(converted))}, float32); nibble cache lists and clears it"
    )
    nibble.load_model(path, quantize="nf4")
    tokenizer = load_tokenizer(helpers.write_tokenizer(tmp_path / "tok"))
    load_classification(
        helpers.write_jsonl(tmp_path / "d.jsonl", [{"text": "ab", "label": 0}, {"text": "c", "label": 1}]), tokenizer
    )
    (cache / "notes.txt").write_text("mine")  # not nibble's: never listed, never removed
    capsys.readouterr()

    assert main(["cache", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    entries = {line.split()[0]: line for line in lines[:3]}
    assert list(entries) == ["converted", "quantized", "tokens"] and "notes.txt" not in "".join(lines)
    assert entries["converted"].endswith(f"  {converted}")
    assert format_size(tree_bytes(converted)) in entries["converted"]
    assert re.fullmatch(rf"quantized +[\d.]+ KiB  {cache}/quantized/.*\.safetensors", entries["quantized"])
    summary = {line.split()[0]: line for line in lines[3:]}
    assert summary["tokens"].endswith(f"1 entry in {cache / 'tokens'}") and "downloads" in summary
    total = sum(tree_bytes(p) for p in [converted, *(cache / "quantized").iterdir(), *(cache / "tokens").iterdir()])
    assert summary["total"].split()[1:] == format_size(total).split()

    assert main(["cache", "clear", "tokens"]) == 0
    assert capsys.readouterr().out.startswith("cache: removed 1 entry, ")
    assert not list((cache / "tokens").iterdir()) and converted.is_dir()
    assert main(["cache", "clear"]) == 0
    assert capsys.readouterr().out.startswith("cache: removed 2 entries, ")
    assert not list((cache / "converted").iterdir()) and not list((cache / "quantized").iterdir())
    assert (cache / "notes.txt").read_text() == "mine"

    assert main(["cache", "size", "models"]) == 2
    assert capsys.readouterr().err == (
        "error: 'models' is no kind of nibble cache; use one or more of converted, quantized, tokens, downloads\n"
    )


def test_export_caches_nothing(cache, tmp_path, capsys):
    base, _ = helpers.make_hf_checkpoint(tmp_path / "base", "qwen2")
    args = ["export", "--model", base, "--output", tmp_path / "m.gguf", "--quant", "q4_k", "--eval-tokens", 64]
    assert main([str(a) for a in args]) == 0
    assert "perplexity" in capsys.readouterr().out  # the file was read back
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))
