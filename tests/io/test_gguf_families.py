"""GGUF out and in for the MoE and hybrid Qwen families (llama.cpp's qwen3moe, qwen35, qwen35moe, qwen3next).

References: the gguf package's tensor-name map for each architecture (the names llama.cpp's converter writes),
the converter's value rules written out here independently of nibble's (norms as ``1 + w``, ``A_log`` as
``-exp``, value heads tiled, fused projections split), and the transformers source model's logits after a round
trip. (transformers' own GGUF loader reads qwen3moe files without their expert size or top-k renormalization,
so it is no reference here.)
"""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from gguf_files import save_tiny, tiny_model
from nibble.cli.main import main
from nibble.errors import NibbleError
from nibble.io.gguf import convert_gguf, open_gguf
from nibble.io.tokenizer import load_tokenizer
from nibble.model import load_model
from nibble.model.export import export_model

FAMILIES = {
    "qwen3_moe": gguf.MODEL_ARCH.QWEN3MOE,
    "qwen3_5_text": gguf.MODEL_ARCH.QWEN35,
    "qwen3_5_moe_text": gguf.MODEL_ARCH.QWEN35MOE,
    "qwen3_next": gguf.MODEL_ARCH.QWEN3NEXT,
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Per family: (source directory, the transformers model, its f32 GGUF export), built once."""
    built = {}

    def get(model_type: str):
        if model_type not in built:
            root = tmp_path_factory.mktemp(model_type)
            hf = tiny_model(model_type, tie_word_embeddings=False)
            source = save_tiny(root / "model", hf)
            model = load_model(source)
            export_model(model, load_tokenizer(source), root / "model.gguf", "f32")
            built[model_type] = (source, hf, root / "model.gguf")
        return built[model_type]

    return get


def read_gguf(path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file by name, in torch order (dequantized by the gguf package)."""
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = [int(d) for d in reversed(t.shape.tolist())]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        out[t.name] = torch.from_numpy(np.array(values, dtype=np.float32))
    return out


def tiled(t: torch.Tensor, dim: int, k_heads: int, per_k: int, size: int) -> torch.Tensor:
    """The converter's value-head order along ``dim``: position ``j * k_heads + k`` holds HF's head
    ``k * per_k + j`` (each ``size`` wide)."""
    order = [(k * per_k + j) * size + c for j in range(per_k) for k in range(k_heads) for c in range(size)]
    return t.index_select(dim, torch.tensor(order))


def converter_tensors(hf, arch: gguf.MODEL_ARCH) -> dict[str, torch.Tensor]:
    """What llama.cpp's converter writes for the transformers model ``hf``, from its published rules."""
    config = hf.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    hybrid = arch != gguf.MODEL_ARCH.QWEN3MOE
    nk, nv = getattr(config, "linear_num_key_heads", 0), getattr(config, "linear_num_value_heads", 0)
    dk, dv = getattr(config, "linear_key_head_dim", 0), getattr(config, "linear_value_head_dim", 0)
    reorder = arch in (gguf.MODEL_ARCH.QWEN35, gguf.MODEL_ARCH.QWEN35MOE)
    out = {}
    for name, value in hf.state_dict().items():
        value = value.detach().float()
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name.endswith("experts.gate_up_proj"):
            half = value.shape[1] // 2
            out[names.get_name(name.replace("gate_up_proj", "gate_proj")) + ".weight"] = value[:, :half]
            out[names.get_name(name.replace("gate_up_proj", "up_proj")) + ".weight"] = value[:, half:]
            continue
        if name.endswith("experts.down_proj"):  # (3-D stacks carry no suffix in HF, ".weight" in GGUF)
            out[names.get_name(name) + ".weight"] = value
            continue
        if reorder and ".linear_attn." in name:
            if "in_proj_qkv" in name or "conv1d" in name:
                value = value.squeeze(1) if "conv1d" in name else value
                value = torch.cat([value[: 2 * nk * dk], tiled(value[2 * nk * dk :], 0, nk, nv // nk, dv)])
            elif "in_proj_z" in name:
                value = tiled(value, 0, nk, nv // nk, dv)
            elif "in_proj_a" in name or "in_proj_b" in name or "A_log" in name or "dt_bias" in name:
                value = tiled(value, 0, nk, nv // nk, 1)
            elif "out_proj" in name:
                value = tiled(value, 1, nk, nv // nk, dv)
        if name.endswith("in_proj_qkvz.weight"):  # [q, k, v, z] per key head -> all q, all k, all v | all z
            hidden = value.shape[1]
            grouped = value.T.reshape(hidden, nk, -1)
            q, k, v, z = grouped.split([dk, dk, nv // nk * dv, nv // nk * dv], dim=-1)
            qkv = torch.cat([x.reshape(hidden, -1) for x in (q, k, v)], dim=-1).T
            out[names.get_name(name.replace("in_proj_qkvz", "in_proj_qkv"), try_suffixes=(".weight",))] = qkv
            out[names.get_name(name.replace("in_proj_qkvz", "in_proj_z"), try_suffixes=(".weight",))] = z.reshape(
                hidden, -1
            ).T
            continue
        if name.endswith("A_log"):
            value = -value.exp()
        if "conv1d" in name:
            value = value.squeeze()
        if hybrid and name.endswith("norm.weight") and not name.endswith("linear_attn.norm.weight"):
            value = value + 1
        key = name.replace(".dt_bias", ".dt_proj.bias")
        out[names.get_name(key, try_suffixes=(".weight", ".bias"))] = value
    return out


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_export_writes_what_llama_cpps_converter_writes(exported, model_type):
    source, hf, path = exported(model_type)
    arch = FAMILIES[model_type]
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == gguf.MODEL_ARCH_NAMES[arch]
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[arch]}
    ours, theirs = read_gguf(path), converter_tensors(hf, arch)
    assert set(ours) == set(theirs)
    for name, want in theirs.items():
        assert re.sub(r"^blk\.\d+\.", "blk.{bid}.", re.sub(r"\.(weight|bias)$", "", name)) in allowed, name
        torch.testing.assert_close(ours[name], want, rtol=1e-6, atol=1e-6, msg=name)
    arch_name = gguf.MODEL_ARCH_NAMES[arch]
    fields = {f: reader.fields[f].contents() for f in reader.fields}
    if model_type != "qwen3_5_text":
        assert fields[f"{arch_name}.expert_count"] == 4 and fields[f"{arch_name}.expert_used_count"] == 2
        assert fields[f"{arch_name}.expert_feed_forward_length"] == 64
    if model_type != "qwen3_moe":
        assert fields[f"{arch_name}.full_attention_interval"] == 2  # layers 0, 1, 2: linear, full, linear
        assert fields[f"{arch_name}.ssm.group_count"] == 2 and fields[f"{arch_name}.ssm.time_step_rank"] == 4
        assert fields[f"{arch_name}.ssm.state_size"] == 16 and fields[f"{arch_name}.ssm.inner_size"] == 64
        assert fields[f"{arch_name}.rope.dimension_count"] == 8  # a quarter of the 32-wide heads
    if model_type in ("qwen3_5_text", "qwen3_5_moe_text"):
        assert fields[f"{arch_name}.rope.dimension_sections"] == [2, 1, 1, 0]


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_round_trip_gives_the_source_models_logits(exported, model_type, tmp_path):
    source, hf, path = exported(model_type)
    ids = torch.randint(5, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        ours = load_model(path)(ids)  # nibble reading the file
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    back = convert_gguf(path, tmp_path / "back")  # and the directory it converts to, read by transformers
    theirs = AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_q8_0_export_reads_back_within_its_rounding(exported, model_type, tmp_path):
    source, hf, f32_path = exported(model_type)
    path = tmp_path / "q8.gguf"
    export_model(load_model(source), load_tokenizer(source), path, "q8_0")
    exact, rounded = read_gguf(f32_path), read_gguf(path)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert set(rounded) == set(exact) and types["blk.1.attn_q.weight"] == "Q8_0"
    full = [n for n in types if n.endswith(("ffn_gate_inp.weight", "ssm_conv1d.weight", "norm.weight", "ssm_a"))]
    assert full and all(types[n] == "F32" for n in full)
    for name, want in exact.items():  # each weight within q8_0's rounding (a step of absmax / 127 per block)
        got = rounded[name]
        assert float((got - want).norm() / want.norm()) <= (0 if types[name] == "F32" else 1e-2), name
    # and the rounded file read by nibble computes what transformers computes on the same rounded weights
    # (a random tiny DeltaNet amplifies weight rounding several-fold, so the f32 model is no yardstick here)
    theirs = AutoModelForCausalLM.from_pretrained(convert_gguf(path, tmp_path / "back"), dtype=torch.float32)
    ids = torch.randint(5, hf.config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(load_model(path)(ids), theirs.eval()(ids).logits, rtol=1e-4, atol=1e-4)


def test_what_llama_cpp_cannot_hold_is_one_line(exported, tmp_path, capsys):
    source, hf, path = exported("qwen3_5_text")
    # full attention on layers 0 and 2 of three: no single full_attention_interval says that
    kinds = ["full_attention", "linear_attention", "full_attention"]
    odd = save_tiny(tmp_path / "odd", tiny_model("qwen3_5_text", layer_types=kinds))
    capsys.readouterr()
    args = ["export", "--model", str(odd), "--output", str(tmp_path / "odd.gguf"), "--eval-tokens", "0"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: layer_types") and "full_attention_interval" in err and err.count("\n") == 1
    assert not (tmp_path / "odd.gguf").exists()
    # the native-blocks base is for the dense families' files
    with pytest.raises(NibbleError, match="use --quant-format nf4 or int4"):
        load_model(path, quantize="gguf")
    # a LoRA adapter alone: llama.cpp's per-projection adapters do not cover the DeltaNet layout
    peft_model = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "in_proj_qkv"]))
    peft_model.save_pretrained(tmp_path / "adapter")
    capsys.readouterr()
    args = ["export", "--model", str(source), "--adapter", str(tmp_path / "adapter"), "--adapter-only"]
    assert main([*args, "--output", str(tmp_path / "a.gguf")]) == 2
    err = capsys.readouterr().err
    assert "export the model with the adapter merged instead" in err and err.count("\n") == 1
    assert not (tmp_path / "a.gguf").exists()


def test_a_corrupt_expert_count_is_one_line(exported, tmp_path):
    source, hf, path = exported("qwen3_moe")
    data = bytearray(path.read_bytes())
    key = b"qwen3moe.expert_used_count"
    at = data.index(key) + len(key) + 4  # the uint32 value follows its 4-byte type
    data[at : at + 4] = (99).to_bytes(4, "little")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(NibbleError, match="99 of 4 experts per token; the file is corrupt"):
        open_gguf(bad)


def test_cli_export_reports_the_exported_files_perplexity_and_leaves_only_it(exported, tmp_path, capsys):
    source, hf, path = exported("qwen3_5_moe_text")
    out = tmp_path / "out"
    out.mkdir()
    args = ["export", "--model", str(source), "--output", str(out / "m.gguf"), "--quant", "q8_0"]
    assert main([*args, "--eval-tokens", "256"]) == 0
    assert "read back dequantized" in capsys.readouterr().out
    report = json.loads((out / "m.report.json").read_text())
    assert report["architecture"] == "qwen35moe" and abs(report["perplexity"]["change"]) < 0.05
    assert sorted(p.name for p in out.iterdir()) == ["m.gguf", "m.report.json"]  # the read-back is gone
