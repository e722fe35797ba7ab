"""Qwen3-MoE against transformers: logits from both expert layouts, routing, the load-balancing loss, 4-bit experts."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import right_padded_batch, save_fused_experts
from nibble.errors import NibbleError
from nibble.model import ModelConfig, load_model
from nibble.model.moe import SparseMoE, load_balancing_loss, sparse_blocks
from nibble.quant import NF4Weight, QuantSpec


@pytest.fixture(scope="module")
def moe_checkpoint(shared_checkpoint, tmp_path_factory):
    """(per-expert dir, fused dir, transformers model): a tiny Qwen3-MoE whose first layer is dense."""
    path, hf = shared_checkpoint("qwen3_moe", mlp_only_layers=[0])
    fused = tmp_path_factory.mktemp("fused") / "m"
    shutil.copytree(path, fused)
    return path, save_fused_experts(fused), hf


def test_config_reads_moe_keys(moe_checkpoint):
    config = ModelConfig.from_hf(moe_checkpoint[0])
    assert config.model_type == "qwen3_moe" and config.qk_norm
    moe = config.moe
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (4, 2, 64)
    assert moe.norm_topk_prob and moe.mlp_only_layers == (0,)
    assert [moe.is_sparse(i) for i in range(2)] == [False, True]
    again = ModelConfig.from_hf(config.to_hf())
    assert again.moe == moe


def test_config_rejects_top_k_above_experts(moe_checkpoint):
    data = ModelConfig.from_hf(moe_checkpoint[0]).to_hf()
    data["num_experts_per_tok"] = 9
    with pytest.raises(NibbleError, match="num_experts_per_tok"):
        ModelConfig.from_hf(data)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_logits_equal_transformers(moe_checkpoint, layout):
    per_expert, fused, hf = moe_checkpoint
    model = load_model(per_expert if layout == "per_expert" else fused)
    assert isinstance(model.model.layers[1].mlp, SparseMoE)
    ids, mask = right_padded_batch([7, 5], seed=1)
    with torch.no_grad():
        ours = model(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=0)


def test_routing_equals_transformers(moe_checkpoint):
    per_expert, _, hf = moe_checkpoint
    model = load_model(per_expert)
    x = torch.randn(13, hf.config.hidden_size)
    with torch.no_grad():
        _, weight, index = model.model.layers[1].mlp.route(x)
        _, ref_weight, ref_index = hf.model.layers[1].mlp.gate(x)
    assert torch.equal(index, ref_index)
    torch.testing.assert_close(weight, ref_weight, atol=1e-6, rtol=0)


def test_load_balancing_loss_equals_transformers(shared_checkpoint):
    path, hf = shared_checkpoint("qwen3_moe")  # both layers sparse: the loss pools them
    model = load_model(path).train()
    ids, mask = right_padded_batch([6, 4, 3], seed=2)
    model(ids, mask)
    ours = load_balancing_loss(model)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)
    assert ours.requires_grad is False  # the router is frozen unless trained
    assert load_balancing_loss(model) is None  # records are consumed


def test_nf4_experts_hold_bitsandbytes_bytes_per_expert(moe_checkpoint):
    from bitsandbytes.functional import quantize_4bit

    per_expert, fused, hf = moe_checkpoint
    for path in (per_expert, fused):
        model = load_model(path, quantize="nf4")
        proj = model.model.layers[1].mlp.experts.gate_up_proj
        assert isinstance(proj.qweight, NF4Weight) and proj.weight is None
        ref = hf.model.layers[1].mlp.experts.gate_up_proj.detach()  # [E, 2I, H]
        for e in range(ref.shape[0]):
            packed, state = quantize_4bit(ref[e].contiguous(), blocksize=64, quant_type="nf4")
            mine = proj.expert_weight(e)
            assert torch.equal(mine.packed, packed.view(-1))
            assert torch.equal(mine.absmax, state.absmax)


@pytest.mark.parametrize(
    "spec", [QuantSpec("nf4"), QuantSpec("nf4", double_quant=True), QuantSpec("int4", group_size=64)], ids=str
)
def test_quantized_experts_equal_dequantized_oracle(moe_checkpoint, spec):
    """A 4-bit model's logits equal a dense model holding its dequantized experts."""
    per_expert, _, _ = moe_checkpoint
    model = load_model(per_expert, quantize=spec)
    dense = load_model(per_expert)
    for block, dense_block in zip(sparse_blocks(model), sparse_blocks(dense), strict=True):
        for name in ("gate_up_proj", "down_proj"):
            getattr(dense_block.experts, name).set_weight(getattr(block.experts, name).dequantize())
    for layer, dense_layer in zip(model.model.layers, dense.model.layers, strict=True):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(dense_layer.self_attn, name).weight.data = getattr(layer.self_attn, name).dequantize()
        if not isinstance(layer.mlp, SparseMoE):
            for name in ("gate_proj", "up_proj", "down_proj"):
                getattr(dense_layer.mlp, name).weight.data = getattr(layer.mlp, name).dequantize()
    ids, mask = right_padded_batch([6, 5], seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), dense(ids, mask), atol=1e-5, rtol=0)


def test_missing_expert_is_one_line(moe_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    per_expert = moe_checkpoint[0]
    broken = tmp_path / "broken"
    shutil.copytree(per_expert, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", {"format": "pt"})
    with pytest.raises(NibbleError, match=r"missing tensor 'model.layers.1.mlp.experts.3.up_proj.weight'"):
        load_model(broken)
