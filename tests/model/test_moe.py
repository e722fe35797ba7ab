"""Qwen3-MoE, Qwen3-Next and Qwen3.5-MoE against transformers: logits from both expert layouts, routing, the
load-balancing loss, 4-bit experts, generation."""

from __future__ import annotations

import shutil

import pytest
import torch

from helpers import hf_config, right_padded_batch, save_fused_experts
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
    for block in sparse_blocks(model):
        block.record_stats = True
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


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_merge_writes_the_source_layout_and_transformers_loads_it(moe_checkpoint, tmp_path, layout):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from nibble.io.peft import adapter_config, save_adapter
    from nibble.model.adapter import load_adapted
    from nibble.model.merge import merge_adapter
    from nibble.nn.lora import apply_lora, expert_lora_layers, resolve_targets

    source = moe_checkpoint[0] if layout == "per_expert" else moe_checkpoint[1]
    model = load_model(source, quantize="nf4")
    apply_lora(model, "all-linear", rank=2, alpha=4.0)
    with torch.no_grad():
        for layer in expert_lora_layers(model).values():
            layer.lora_B.normal_(0, 0.3)
    config = adapter_config(
        base_model=None, targets=list(resolve_targets("all-linear")), rank=2, alpha=4.0, dropout=0.0, use_rslora=False,
        task="causal_lm",
    )  # fmt: skip
    save_adapter(model, tmp_path / "adapter", config)
    from nibble.io.runinfo import RunInfo

    RunInfo(quant=QuantSpec("nf4")).save(tmp_path / "adapter" / "nibble.json")
    merged, _ = merge_adapter(source, tmp_path / "adapter", tmp_path / "merged")
    with safe_open(merged / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    fused_key = "model.layers.1.mlp.experts.gate_up_proj"
    assert (fused_key in keys) == (layout == "fused")
    assert ("model.layers.1.mlp.experts.3.up_proj.weight" in keys) == (layout == "per_expert")
    hf = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    adapted, _ = load_adapted(source, tmp_path / "adapter")
    ids, mask = right_padded_batch([6, 3], seed=4)
    with torch.no_grad():
        ours, theirs = adapted(ids, mask), hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)


def test_router_loss_adds_the_weighted_aux_loss_and_logs_it(shared_checkpoint):
    from nibble.model.moe import RouterLoss

    path, _ = shared_checkpoint("qwen3_moe")
    model = load_model(path).train()
    ids, mask = right_padded_batch([5, 5], seed=7)
    task = lambda outputs, batch: (outputs.float().mean(), {"seen": torch.tensor(1.0)})  # noqa: E731
    wrapped = RouterLoss(model, task, weight=0.5)
    logits = model(ids, mask)
    total, metrics = wrapped(logits, {})
    for block in sparse_blocks(model):  # the same forward again gives the aux loss alone
        block.record_stats = True
    model(ids, mask)
    aux = load_balancing_loss(model)
    torch.testing.assert_close(total, logits.mean() + 0.5 * aux)
    assert metrics.keys() == {"seen", "router_aux_loss"}  # logged beside the task's own metrics
    torch.testing.assert_close(metrics["router_aux_loss"], aux.detach())


def test_router_aux_loss_flag():
    from nibble.train.config import TrainConfig

    assert TrainConfig(router_aux_loss="off").router_aux_weight(0.001) == 0.0
    assert TrainConfig(router_aux_loss="on").router_aux_weight(0.001) == 0.001
    assert TrainConfig(router_aux_loss=0.02).router_aux_weight(0.001) == 0.02
    with pytest.raises(NibbleError, match="'router_aux_loss' must be off, on or a weight >= 0"):
        TrainConfig(router_aux_loss="sometimes").router_aux_weight(0.001)


@pytest.mark.parametrize("spec", [QuantSpec("nf4"), QuantSpec("nf4", double_quant=True)], ids=str)
def test_plan_counts_what_a_loaded_model_holds(moe_checkpoint, spec):
    from helpers import plan_opts
    from nibble.model.memory import plan_rows, projections_bytes
    from nibble.nn.lora import apply_lora

    model = load_model(moe_checkpoint[0], quantize=spec)
    held = sum(m.qweight.memory_bytes() for m in model.modules() if getattr(m, "qweight", None) is not None)
    assert projections_bytes(model.config, spec) == held
    for block in sparse_blocks(model):
        block.gate.weight.requires_grad_(True)
    apply_lora(model, "all-linear", rank=4, alpha=8.0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quant = dict(quant_format=spec.format, double_quant=spec.double_quant, blocksize=spec.blocksize)
    opts = plan_opts(model.config, **quant, task="instruct", lora_rank=4, lora_targets="all-linear", train_router=True)
    assert opts.quant == spec
    rows = {name: params for name, params, _ in plan_rows(model.config, opts)}
    assert rows["gradients of trainable params [fp32]"] == trainable


# Qwen3-Next (dense first layer, fused DeltaNet projections) and Qwen3.5-MoE (every layer sparse): Gated DeltaNet and
# gated attention layers around sparse blocks with a gated shared expert.
HYBRID = {"qwen3_next": {"mlp_only_layers": [0]}, "qwen3_5_moe_text": {}}


@pytest.fixture(scope="module", params=list(HYBRID))
def hybrid_moe(shared_checkpoint, tmp_path_factory, request):
    """(family, per-expert dir, fused dir, transformers model)."""
    path, hf = shared_checkpoint(request.param, **HYBRID[request.param])
    fused = tmp_path_factory.mktemp("fused") / "m"
    shutil.copytree(path, fused)
    return request.param, path, save_fused_experts(fused), hf


def test_hybrid_moe_config_reads_the_shared_expert(hybrid_moe):
    family, path, _, _ = hybrid_moe
    config = ModelConfig.from_hf(path)
    moe = config.moe
    assert config.is_hybrid and config.qk_norm and config.attn_output_gate and config.zero_centred_norm
    assert config.linear_fused_projections == (family == "qwen3_next")
    assert moe.shared_expert_intermediate_size == 32 and moe.norm_topk_prob
    assert [moe.is_sparse(i) for i in range(3)] == [family != "qwen3_next", True, True]
    assert ModelConfig.from_hf(config.to_hf()) == config


def test_qwen35_moe_multimodal_config_is_its_text_config():
    import json

    from transformers import Qwen3_5MoeConfig

    text = json.loads(hf_config("qwen3_5_moe_text").to_json_string())
    data = json.loads(Qwen3_5MoeConfig(text_config=text).to_json_string())
    config = ModelConfig.from_hf(data)
    assert config.multimodal and config.model_type == "qwen3_5_moe_text" and config.moe.shared_expert_intermediate_size


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_hybrid_moe_logits_equal_transformers(hybrid_moe, layout):
    _, per_expert, fused, hf = hybrid_moe
    model = load_model(per_expert if layout == "per_expert" else fused)
    assert model.model.layers[1].mlp.shared_expert is not None
    ids, mask = right_padded_batch([70, 5], seed=1)  # a row across the delta rule's 64-token chunk
    with torch.no_grad():
        ours = model(ids, mask)
        ref = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=0)


def test_hybrid_moe_load_balancing_loss_and_generation_equal_transformers(hybrid_moe):
    from helpers import PAD_ID
    from nibble.model.generate import generate

    _, path, _, hf = hybrid_moe
    model = load_model(path).train()
    for block in sparse_blocks(model):
        block.record_stats = True
    ids, mask = right_padded_batch([6, 4, 3], seed=2)
    model(ids, mask)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    torch.testing.assert_close(load_balancing_loss(model), ref, atol=1e-6, rtol=0)
    prompt, _ = right_padded_batch([9], seed=3)
    ours = generate(model.eval(), prompt, max_new_tokens=8, eos_token_id=[])
    theirs = hf.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
    assert ours == theirs[0, prompt.shape[1] :].tolist()


def test_hybrid_moe_plan_counts_the_weights_it_holds(hybrid_moe):
    from nibble.model.memory import format_rows, projections_bytes
    from nibble.nn import QuantLinear
    from nibble.nn.experts import ExpertLinear

    _, path, _, _ = hybrid_moe
    quantized = load_model(path, quantize="nf4")
    held = sum(m.qweight.memory_bytes() for m in quantized.modules() if isinstance(m, (QuantLinear, ExpertLinear)))
    assert projections_bytes(quantized.config, QuantSpec("nf4")) == held
    dense = load_model(path)
    rows = {name: params for name, params, _ in format_rows(dense.config)}
    assert rows["all weights"] == sum(p.numel() for p in dense.parameters())
