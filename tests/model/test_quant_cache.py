"""The 4-bit base kept on disk: a second load reads the quantized projections instead of quantizing (bit-identical
weights), a changed or damaged source entry is quantized again, and eval/predict after training reuse it."""

from __future__ import annotations

import json
import os

import pytest
import torch

import helpers
import nibble.model.loading as loading
from nibble.cli.main import main
from nibble.io.safetensors import SafetensorsFile, load_file, save_file_atomic
from nibble.model import load_model, moe
from nibble.nn import QuantLinear
from nibble.nn.experts import ExpertLinear
from nibble.quant import QuantSpec, quantize

SPECS = [QuantSpec("nf4"), QuantSpec("nf4", blocksize=128, double_quant=True), QuantSpec("int4", group_size=64)]


def quantized(model) -> dict[str, dict[str, torch.Tensor]]:
    """Every QuantLinear's and 4-bit experts' tensors (and compute dtype) by module name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, ExpertLinear)):
            out[name] = {**m.qweight.tensors(), "dtype": torch.tensor([], dtype=m.qweight.dtype)}
    return out


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        for key, tensor in a[name].items():
            other = b[name][key]
            assert tensor.dtype == other.dtype and torch.equal(tensor, other), (name, key)


def no_quantizing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("quantized again")

    monkeypatch.setattr(loading, "quantize", refuse)
    monkeypatch.setattr(moe, "quantize_rows", refuse)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name + str(s.blocksize))
def test_a_second_load_reads_bit_identical_weights_from_the_cache(tmp_path, monkeypatch, spec):
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    path, _ = helpers.make_hf_checkpoint(tmp_path / "m", "qwen3")
    first = quantized(load_model(path, quantize=spec))
    entries = list((tmp_path / "cache" / "quantized").iterdir())
    assert len(entries) == 1 and entries[0].suffix == ".safetensors"

    no_quantizing(monkeypatch)
    again = load_model(path, quantize=spec, dtype=torch.bfloat16)
    second = quantized(again)
    assert all(w["dtype"].dtype == torch.bfloat16 for w in second.values())
    for w in (*first.values(), *second.values()):
        del w["dtype"]
    assert_identical(first, second)
    ids, mask = helpers.right_padded_batch([6, 4])
    with torch.no_grad():  # and the model works from them
        assert torch.isfinite(again(ids, mask).float()).all()


def test_the_experts_of_a_moe_model_come_from_the_cache_too(tmp_path, monkeypatch):
    """Qwen3-Next: DeltaNet, attention, dense and shared-expert projections, and each sparse layer's experts."""
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    path, _ = helpers.make_hf_checkpoint(tmp_path / "m", "qwen3_next", mlp_only_layers=[0])
    first = quantized(load_model(path, quantize="nf4"))
    assert "model.layers.1.mlp.experts.gate_up_proj" in first and "model.layers.1.mlp.shared_expert.up_proj" in first
    no_quantizing(monkeypatch)
    second = quantized(load_model(path, quantize="nf4"))
    assert_identical(first, second)


def test_a_changed_source_or_a_damaged_entry_is_quantized_again(tmp_path, monkeypatch):
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    path, _ = helpers.make_hf_checkpoint(tmp_path / "m", "llama")
    load_model(path, quantize="nf4")
    helpers.make_hf_checkpoint(path, "llama", seed=1)  # new weights, same file names and sizes
    changed = quantized(load_model(path, quantize="nf4"))
    weights = load_file(path / "model.safetensors")
    for name, tensors in changed.items():
        fresh = quantize(weights[f"{name}.weight"], "nf4").tensors()
        assert all(torch.equal(tensors[k], fresh[k]) for k in fresh), name
    (entry,) = (tmp_path / "cache" / "quantized").iterdir()  # the old entry was replaced, not kept beside it

    entry.write_bytes(entry.read_bytes()[:1000])  # truncated: read as no entry, made again
    assert_identical(quantized(load_model(path, quantize="nf4")), changed)
    no_quantizing(monkeypatch)
    assert_identical(quantized(load_model(path, quantize="nf4")), changed)


def test_predict_after_train_reuses_the_4bit_base(tmp_path, monkeypatch):
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    path, _ = helpers.make_hf_checkpoint(tmp_path / "m", "qwen3")
    rows = [{"text": w, "label": w[0]} for w in ("apple", "berry", "avocado", "banana")] * 4
    data = helpers.write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    args = ["train", "--model", path, "--data", data, "--output", out, "--max-steps", 2, "--val-split", 0]
    assert main([str(a) for a in [*args, "--double-quant"]]) == 0
    no_quantizing(monkeypatch)
    predict = ["predict", "--model", path, "--adapter", out / "adapter", "--data", data]
    predict += ["--output", tmp_path / "p.jsonl"]
    assert main([str(a) for a in predict]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == len(rows)


def rewrite_entry(entry, change):
    """The entry with ``change(tensors, keys)`` applied, its metadata stamp kept (a hostile or stale writer)."""
    stored = SafetensorsFile(entry)
    tensors = {name: stored.read(name) for name in stored.tensors}
    keys = json.loads(stored.metadata["nibble.weights"])
    keys = change(tensors, keys) or keys
    save_file_atomic(tensors, entry, metadata={**stored.metadata, "nibble.weights": json.dumps(keys)})


Q = "model.layers.0.self_attn.q_proj.weight"
K = "model.layers.0.self_attn.k_proj.weight"


def other_shape(tensors, keys):  # q_proj replaced by a valid NF4 weight of k_proj's shape
    for name in [n for n in tensors if n.startswith(Q)]:
        tensors[name] = tensors[K + name[len(Q) :]]


def int8_packed(tensors, keys):  # (the loader's view as uint8 would take it silently)
    tensors[Q] = tensors[Q].view(torch.int8)


def float32_scales(tensors, keys):  # INT4 (its constructor would convert them to float16 silently)
    name = Q.removesuffix("weight") + "scales_4bit"
    tensors[name] = tensors[name].float()


def nan_absmax(tensors, keys):
    tensors[f"{Q}.absmax"][0] = float("nan")


def one_fewer(tensors, keys):
    for name in [n for n in tensors if n.startswith(Q)]:
        del tensors[name]
    return [k for k in keys if k != Q]


def one_more(tensors, keys):
    extra = "model.layers.9.self_attn.q_proj.weight"
    for name in [n for n in tensors if n.startswith(Q)]:
        tensors[extra + name[len(Q) :]] = tensors[name]
    return [*keys, extra]


def stray_tensor(tensors, keys):
    tensors["stray"] = torch.zeros(3)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (other_shape, "does not fit this model ('model.layers.0.self_attn.q_proj.weight' is"),
        (int8_packed, "is damaged (tensor 'model.layers.0.self_attn.q_proj.weight' is torch.int8"),
        (float32_scales, "is damaged (tensor 'model.layers.0.self_attn.q_proj.scales_4bit' is torch.float32"),
        (nan_absmax, "NaN or infinite"),
        (one_fewer, "does not fit this model (it holds"),
        (one_more, "does not fit this model (it holds"),
        (stray_tensor, "is damaged (it holds tensors no weight uses)"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_an_entry_that_does_not_fit_the_model_is_made_again_in_one_line(tmp_path, monkeypatch, capsys, change, said):
    """Shapes, dtypes, finiteness and counts of an entry's tensors that disagree with what the model needs: the
    load quantizes again (the weights equal a fresh quantization), says so once, and the next load reads the
    remade entry without quantizing."""
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    path, _ = helpers.make_hf_checkpoint(tmp_path / "m", "llama")
    spec = QuantSpec("int4", group_size=64) if change is float32_scales else QuantSpec("nf4")
    first = quantized(load_model(path, quantize=spec))
    (entry,) = (tmp_path / "cache" / "quantized").iterdir()
    rewrite_entry(entry, change)
    capsys.readouterr()
    assert_identical(quantized(load_model(path, quantize=spec)), first)
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and said in err and "quantiz" in err, err
    no_quantizing(monkeypatch)
    assert_identical(quantized(load_model(path, quantize=spec)), first)
    assert "note:" not in capsys.readouterr().err


def test_a_gguf_read_natively_writes_no_entry(tmp_path, monkeypatch, capsys):
    """``--quant gguf`` keeps the file's own blocks: there is nothing to quantize, so nothing to cache (an entry
    was written on every load and read back as damaged)."""
    from gguf_files import tiny_model, write_gguf

    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "m.gguf", tiny_model("llama"))
    for _ in range(2):
        load_model(path, quantize="gguf")
    assert not (tmp_path / "cache" / "quantized").exists()
    assert "note:" not in capsys.readouterr().err


def test_a_cache_that_cannot_be_written_is_skipped_with_one_line(tmp_path, monkeypatch, capsys):
    """NIBBLE_CACHE under a regular file: the 4-bit base is quantized and used, the entry is left out, said once."""
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "file" / "cache"))
    path, _ = helpers.make_hf_checkpoint(tmp_path / "m", "qwen3")
    model = load_model(path, quantize="nf4")
    assert quantized(model)
    err = capsys.readouterr().err
    assert err.count("note: cannot keep the 4-bit weights in the cache: ") == 1 and str(tmp_path / "file") in err


def test_names_longer_than_a_file_name_may_be_are_cut_for_the_cache(tmp_path, monkeypatch):
    """A model directory and a .gguf file whose names fill most of a file name's 255 bytes (80 three-byte
    characters; a 245-character stem): their cache entries' names are cut to fit, and are found again."""
    from gguf_files import tiny_model, write_gguf

    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    path, _ = helpers.make_hf_checkpoint(tmp_path / ("模" * 80), "qwen3")
    first = quantized(load_model(path, quantize="nf4"))
    gguf = write_gguf(tmp_path / ("g" * 245 + ".gguf"), tiny_model("llama"))
    load_model(gguf, quantize="nf4")
    names = [p.name for p in (tmp_path / "cache").rglob("*")]
    assert len(names) > 3 and all(len(n.encode()) <= 200 for n in names), max(names, key=len)
    no_quantizing(monkeypatch)
    assert_identical(quantized(load_model(path, quantize="nf4")), first)
    load_model(gguf, quantize="nf4")


def swap_keeping_size_and_mtime(path, replacement):
    """``path`` replaced by ``replacement`` (another file of the same size) with ``path``'s mtime: another inode."""
    stat = path.stat()
    assert replacement.stat().st_size == stat.st_size
    os.utime(replacement, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(replacement, path)


def test_a_same_size_same_mtime_swap_of_a_model_or_gguf_is_noticed(tmp_path, monkeypatch):
    """The 4-bit cache (a model directory's weights) and the GGUF conversion (a .gguf file) both notice a file
    replaced by another of the same size and mtime: the new weights are what loads."""
    from gguf_files import tiny_model, write_gguf

    monkeypatch.setenv("NIBBLE_CACHE", str(tmp_path / "cache"))
    path, _ = helpers.make_hf_checkpoint(tmp_path / "m", "qwen3", tokenizer=False)
    first = quantized(load_model(path, quantize="nf4"))
    other, _ = helpers.make_hf_checkpoint(tmp_path / "other", "qwen3", seed=1, tokenizer=False)
    swap_keeping_size_and_mtime(path / "model.safetensors", other / "model.safetensors")
    with pytest.raises(AssertionError):
        assert_identical(quantized(load_model(path, quantize="nf4")), first)

    gguf = write_gguf(tmp_path / "g.gguf", tiny_model("llama"))
    before = load_model(gguf).state_dict()
    second = write_gguf(tmp_path / "g2.gguf", tiny_model("llama", seed=1))
    swap_keeping_size_and_mtime(gguf, second)
    after = load_model(gguf).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
