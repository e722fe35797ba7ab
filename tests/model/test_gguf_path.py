"""``load_model`` on a .gguf path: converted once into the cache, found there again, redone when the file changes."""

from __future__ import annotations

import os

import pytest
import torch

import nibble
from gguf_files import tiny_model, write_gguf
from nibble.cli.main import main
from nibble.errors import NibbleError
from nibble.io.gguf import convert_gguf, is_gguf
from nibble.model.loading import resolve_model_dir


def test_gguf_path_loads_like_its_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model("qwen3", tie_word_embeddings=True))
    reference = nibble.load_model(convert_gguf(path, tmp_path / "converted"))
    model = nibble.load_model(path)
    cached = resolve_model_dir(path)
    assert cached.parent == tmp_path / "cache" / "converted" and (cached / "tokenizer_config.json").is_file()
    ids = torch.tensor([[5, 9, 200, 17, 3]])
    with torch.no_grad():
        assert torch.equal(model(ids), reference(ids))

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr("nibble.io.gguf.convert_gguf", no_conversion)
    classifier = nibble.load_model(path, task="classify", num_labels=2, quantize="nf4")
    assert classifier.score.weight.shape == (2, 64)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="converted again"):
        nibble.load_model(path)


def test_plan_reads_a_gguf_without_converting_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "tiny.gguf", tiny_model("llama"))
    assert main(["plan", "--model", str(path), "--method", "qlora"]) == 0
    assert capsys.readouterr().out.startswith("llama: 2 layers, hidden 64")
    assert not (tmp_path / "cache").exists()


def test_other_files_are_one_clear_line(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    with pytest.raises(NibbleError, match=r"weights.bin: not a directory \(expected a model directory .* .gguf file\)"):
        nibble.load_model(tmp_path / "weights.bin")
    with pytest.raises(NibbleError, match="no such model directory or .gguf file"):
        nibble.load_model(tmp_path / "missing.gguf")
    assert not is_gguf(tmp_path) and not is_gguf(tmp_path / "weights.bin")


def test_a_float16_conversion_refuses_values_beyond_its_range(tmp_path):
    model = tiny_model("qwen3")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = 1e5  # stored Q8_0: dequantizes past float16's 65504
    path = write_gguf(tmp_path / "big.gguf", model)
    with pytest.raises(NibbleError, match=r"big.gguf: tensor '.*q_proj.weight' holds values beyond float16's range"):
        convert_gguf(path, tmp_path / "f16", dtype=torch.float16)
    assert not (tmp_path / "f16").exists()
    convert_gguf(path, tmp_path / "f32", dtype=torch.float32)  # the fix the message names
