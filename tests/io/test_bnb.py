"""bitsandbytes checkpoints: transformers+bitsandbytes output loads in nibble, nibble's loads in transformers."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import nibble
from helpers import right_padded_batch
from nibble.errors import NibbleError
from nibble.model.quantize import quantize_checkpoint
from nibble.nn import QuantLinear
from nibble.quant import QuantSpec

NF4 = QuantSpec("nf4")

SKIP = ["lm_head", "down_proj"]


def bnb_quantized_hf(path, double_quant: bool, skip=SKIP):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip,
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.float32, device_map="cpu")


def dequantized_copy(dense_hf, quantized_hf):
    """``dense_hf`` with every bitsandbytes 4-bit weight of ``quantized_hf`` replaced by its dequantization."""
    import bitsandbytes.functional as bnbf

    ref = copy.deepcopy(dense_hf)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for name, module in quantized_hf.named_modules():
            state = getattr(getattr(module, "weight", None), "quant_state", None)
            if state is not None:
                modules[name].weight.copy_(bnbf.dequantize_4bit(module.weight.data, state))
    return ref


@pytest.mark.parametrize("double_quant", [False, True])
def test_transformers_bitsandbytes_checkpoint_loads_with_its_bytes(shared_checkpoint, tmp_path, double_quant):
    path, hf = shared_checkpoint("qwen2")
    quantized = bnb_quantized_hf(path, double_quant)
    ref = dequantized_copy(hf, quantized)  # taken before any forward of the bitsandbytes model
    quantized.save_pretrained(tmp_path / "bnb")
    model = nibble.load_model(tmp_path / "bnb")
    q_proj, down = model.model.layers[0].self_attn.q_proj, model.model.layers[0].mlp.down_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.bias is not None and type(down) is torch.nn.Linear
    theirs = quantized.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q_proj.qweight.packed, theirs.data.view(-1))
    assert q_proj.qweight.double_quant == double_quant
    ids, mask = right_padded_batch([9, 4])
    with torch.no_grad():
        ours, expected = model(ids, mask), ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], expected[mask.bool()], atol=1e-4, rtol=0)
    # quantize= leaves the stored bytes alone and applies to the projections stored dense.
    mixed = nibble.load_model(tmp_path / "bnb", quantize=QuantSpec("int4", group_size=64))
    assert mixed.model.layers[1].self_attn.q_proj.format == "nf4"
    assert mixed.model.layers[1].mlp.down_proj.format == "int4"


@pytest.mark.parametrize("double_quant", [False, True])
def test_nibble_quantize_output_loads_in_transformers_byte_identical(shared_checkpoint, tmp_path, double_quant):
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    path, hf = shared_checkpoint("qwen3", dtype=torch.bfloat16)
    out = tmp_path / "q"
    stats = quantize_checkpoint(path, out, QuantSpec("nf4", double_quant=double_quant))
    assert stats["quantized"] == 14
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "generation_config.json"}
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["bnb_4bit_use_double_quant"] == double_quant
    loaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    reference = bnb_quantized_hf(path, double_quant, skip=["lm_head"])  # bitsandbytes quantizing the original
    for name, module in loaded.named_modules():
        if not name.endswith("_proj"):
            continue
        weight, state = module.weight, module.weight.quant_state
        source = dict(hf.named_modules())[name].weight.data.to(torch.bfloat16)
        packed, expected = bnbf.quantize_4bit(source, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        assert torch.equal(weight.data, packed), name
        assert torch.equal(state.absmax, expected.absmax), name
        assert state.dtype == torch.bfloat16 and list(state.shape) == list(source.shape)
        assert torch.equal(weight.data, dict(reference.named_modules())[name].weight.data), name
    # nibble reads its own output exactly as it quantizes on load.
    ids, _ = right_padded_batch([7])
    with torch.no_grad():
        a = nibble.load_model(out)(ids)
        b = nibble.load_model(path, quantize=QuantSpec("nf4", double_quant=double_quant))(ids)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def _set_quantization_config(path, **qc):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = qc
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("qc", "fragment"),
    [
        ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "'fp4'"),
        ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "8-bit"),
        ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq'"),
    ],
)
def test_unsupported_quantization_configs(hf_checkpoint, qc, fragment):
    path, _ = hf_checkpoint("qwen3")
    _set_quantization_config(path, **qc)
    with pytest.raises(NibbleError) as exc:
        nibble.load_model(path)
    assert fragment in str(exc.value) and "config.json" in str(exc.value)


def test_quantize_refuses_quantized_input_and_non_empty_output(shared_checkpoint, tmp_path):
    path, _ = shared_checkpoint("qwen3")
    quantize_checkpoint(path, tmp_path / "once", NF4)
    with pytest.raises(NibbleError, match="already quantized"):
        quantize_checkpoint(tmp_path / "once", tmp_path / "twice", NF4)
    with pytest.raises(NibbleError, match="not an empty directory"):
        quantize_checkpoint(path, tmp_path / "once", NF4)
    (tmp_path / "empty").mkdir()
    quantize_checkpoint(path, tmp_path / "empty", NF4)  # an empty directory is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "once"]  # no temporary left behind
