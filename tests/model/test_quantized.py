"""4-bit models: NF4 logits equal an fp32 transformers model holding bitsandbytes' own quantize -> dequantize."""

from __future__ import annotations

import copy

import pytest
import torch

import nibble
from helpers import right_padded_batch
from nibble.nn import QuantLinear
from nibble.quant import QuantSpec, int4

PROJ_SUFFIX = "_proj"


def bnb_roundtrip(hf, blocksize: int, double_quant: bool):
    """A copy of ``hf`` whose block projections hold bitsandbytes' dequantize_4bit(quantize_4bit(w))."""
    import bitsandbytes.functional as bnbf

    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if name.endswith(PROJ_SUFFIX):
                packed, state = bnbf.quantize_4bit(
                    module.weight.data, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant
                )
                module.weight.copy_(bnbf.dequantize_4bit(packed, state))
    return ref


@pytest.mark.parametrize(
    ("family", "double_quant", "blocksize"),
    [("qwen3", False, 64), ("qwen3", True, 64), ("qwen2", False, 64), ("llama", True, 32)],
)
def test_nf4_logits_equal_bitsandbytes_dequantized_reference(shared_checkpoint, family, double_quant, blocksize):
    path, hf = shared_checkpoint(family)
    ref = bnb_roundtrip(hf, blocksize, double_quant)
    model = nibble.load_model(path, quantize=QuantSpec("nf4", blocksize=blocksize, double_quant=double_quant))
    ids, mask = right_padded_batch([9, 5])
    with torch.no_grad():
        ours, theirs = model(ids, mask), ref(input_ids=ids, attention_mask=mask).logits
        dense = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)
    assert (ours[real] - dense[real]).abs().max() > 1e-2  # the quantization really happened
    q = model.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.qweight.double_quant == double_quant and q.qweight.blocksize == blocksize


def test_nf4_classifier_equals_bitsandbytes_dequantized_reference(shared_checkpoint):
    path, hf = shared_checkpoint("qwen3", num_labels=3, num_hidden_layers=3)
    ref = bnb_roundtrip(hf, 64, False)
    model = nibble.load_model(path, task="classify", quantize="nf4")
    assert all(isinstance(layer.self_attn.q_proj, QuantLinear) for layer in model.model.layers)
    ids, mask = right_padded_batch([9, 5, 1])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), ref(input_ids=ids, attention_mask=mask).logits, atol=1e-4, rtol=0)


def test_int4_logits_equal_reference_with_int4_weights(shared_checkpoint):
    path, hf = shared_checkpoint("qwen2")
    ref = copy.deepcopy(hf)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if name.endswith(PROJ_SUFFIX):
                module.weight.copy_(int4.quantize(module.weight.data, group_size=64).dequantize())
    model = nibble.load_model(path, quantize=QuantSpec("int4", group_size=64))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.format == "int4" and layer.bias is not None  # Qwen2's q bias rides along
    ids, mask = right_padded_batch([7, 3])
    with torch.no_grad():
        ours, theirs = model(ids, mask), ref(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=0)


def test_quantized_model_has_no_trainable_parameters_and_backpropagates_to_inputs(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    model = nibble.load_model(path, quantize="nf4")
    assert not any(p.requires_grad for p in model.parameters())
    ids, _ = right_padded_batch([6])
    embeds = model.model.embed_tokens
    embeds.weight.requires_grad_(True)
    model(ids).sum().backward()
    assert embeds.weight.grad is not None and embeds.weight.grad.abs().sum() > 0
