"""GGUF-native bases (``--quant-format gguf``): the file's own blocks as the frozen base, a QLoRA run on a K-quant
file, and the adapter exported for that very file.

References: the same file loaded dense (dequantized by the gguf package, as ``nibble convert`` does), and
the gguf package's reader for the files written.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from gguf_files import save_tiny, tiny_model, write_gguf
from nibble.cli.main import main
from nibble.errors import NibbleError
from nibble.io.gguf import convert_gguf, open_gguf
from nibble.model import load_model
from nibble.model.loading import resolve_model_dir
from nibble.nn import QuantLinear
from nibble.train.config import TrainConfig
from nibble.train.gguf_export import export_gguf


@pytest.fixture(scope="module")
def k_source(tmp_path_factory):
    """A two-layer Llama with rows of 256 values, as an HF directory."""
    model = tiny_model(
        "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, init_std=0.05
    )
    return save_tiny(tmp_path_factory.mktemp("kquant") / "source", model)


@pytest.fixture(scope="module")
def k_quant_file(k_source):
    """That Llama written by ``nibble export --quant q4_k``: Q4_K projections, a Q6_K head, and llama.cpp's q/k
    row order."""
    path = k_source.parent / "tiny-q4_k.gguf"
    export_gguf(k_source, path, quant="q4_k", eval_tokens=0, log=lambda line: None)
    return path


def logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(5, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("variant", ["q4_k", "q6_k", "llama", "qwen2"])
def test_native_base_computes_what_the_dense_file_computes(k_source, k_quant_file, variant, tmp_path, monkeypatch):
    """The blocks kept as they are give exactly the dense model's logits (the same values, dequantized in torch
    instead of by the gguf package), and hold the file's own bytes."""
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    if variant == "q4_k":
        path = k_quant_file
    elif variant == "q6_k":
        path = export_gguf(k_source, tmp_path / "q6_k.gguf", quant="q6_k", eval_tokens=0, log=lambda line: None)
        path = Path(path["file"])
    else:  # Q8_0 / Q4_0 / Q4_1 / Q5_1 / F16 / BF16 projections (see gguf_files), q/k/v biases for qwen2
        path = write_gguf(tmp_path / f"{variant}.gguf", tiny_model(variant))
    native = load_model(str(path), quantize="gguf")  # (a path as a str, as users write it)
    dense = load_model(convert_gguf(path, tmp_path / "exact", dtype=torch.float32))  # the dequantized values exactly
    torch.testing.assert_close(logits(native), logits(dense), rtol=0, atol=1e-5)
    # --model FILE.gguf converts in the file's own precision: float16 for F16 and block types (within f16's rounding)
    # (float32 where BF16 sits beside other types, as in the synthetic files)
    implicit = load_model(path)
    own = json.loads((resolve_model_dir(path) / "config.json").read_text())["dtype"]
    assert own == ("float16" if variant in ("q4_k", "q6_k") else "float32")
    torch.testing.assert_close(logits(implicit), logits(dense), rtol=0, atol=1e-2)
    layers = [m for m in native.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 7 * native.config.num_hidden_layers
    assert sum(m.qweight.memory_bytes() for m in layers) == open_gguf(path).projection_bytes()
    if variant in ("q4_k", "q6_k"):
        assert native.model.layers[0].self_attn.q_proj.qweight.ggml_type == variant.upper()
    # a directory converted from the file finds its blocks too
    again = load_model(resolve_model_dir(path), quantize="gguf")
    torch.testing.assert_close(logits(again), logits(native), rtol=0, atol=0)


def test_native_base_needs_a_gguf_file(hf_checkpoint):
    path, _ = hf_checkpoint("qwen3")
    with pytest.raises(NibbleError, match="not converted from a .gguf file") as info:
        load_model(path, quantize="gguf")
    assert "\n" not in str(info.value)
    with pytest.raises(NibbleError, match="'quant_format' gguf keeps"):
        TrainConfig(model="m", data="d", output="o", method="lora", quant_format="gguf").validate()


def test_qlora_on_a_k_quant_file_then_export_the_adapter_for_it(k_quant_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    words = ["red", "blue", "green", "pink"]
    rows = [{"instruction": f"Repeat {w}.", "response": f"{w} {w} {w}"} for w in words] * 4
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    args = ["train", "--task", "instruct", "--model", k_quant_file, "--quant-format", "gguf", "--data"]
    args += [tmp_path / "d.jsonl", "--output", run, "--max-steps", 12, "--batch-size", 4, "--lr", 1e-2]
    args += ["--lora-targets", "all-linear", "--lora-dropout", 0, "--val-split", 0, "--log-every", 1]
    assert main([str(a) for a in args]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.5 * sum(losses[:3]), losses
    info = json.loads((run / "adapter" / "nibble.json").read_text())
    assert info["quant"]["format"] == "gguf"
    assert info["gguf_base"] == {"file": k_quant_file.name, "bytes": k_quant_file.stat().st_size}

    # the adapter as a llama.cpp LoRA file, applied by hand to the very file trained on, is the adapted model
    capsys.readouterr()
    lora = tmp_path / "lora.gguf"
    adapter = run / "adapter"
    argv = ["export", "--model", str(k_quant_file), "--adapter", str(adapter), "--adapter-only", "--output", str(lora)]
    assert main(argv + ["--quant", "f32"]) == 0
    assert "apply it to the very .gguf file it was trained on" in capsys.readouterr().out
    merged = tmp_path / "merged.gguf"
    export_gguf(k_quant_file, merged, quant="f32", adapter=adapter, eval_tokens=0, log=lambda line: None)

    def read(path) -> dict[str, np.ndarray]:
        reader = gguf.GGUFReader(path)
        return {
            t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape.tolist())])
            for t in reader.tensors
        }

    base, update, want = read(k_quant_file), read(lora), read(merged)
    alpha = gguf.GGUFReader(lora).fields["adapter.lora.alpha"].contents()
    names = [n.removesuffix(".lora_a") for n in update if n.endswith(".lora_a")]
    assert len(names) == 14
    for name in names:
        a, b = update[f"{name}.lora_a"], update[f"{name}.lora_b"]
        np.testing.assert_allclose(base[name] + b @ a * (alpha / a.shape[0]), want[name], rtol=0, atol=2e-6)

    # the adapter belongs to that file: another one is refused in one line
    other = tmp_path / "other.gguf"
    export_gguf(k_quant_file, other, quant="q8_0", eval_tokens=0, log=lambda line: None)
    generate = ["generate", "--model", str(other), "--adapter", str(adapter), "--prompt", "Repeat red."]
    assert main(generate) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "trained on the blocks of tiny-q4_k.gguf" in err
