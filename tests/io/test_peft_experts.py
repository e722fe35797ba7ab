"""LoRA on the experts of Qwen3-MoE, Qwen3-Next and Qwen3.5-MoE in PEFT's layout for fused parameters: PEFT loads
nibble's adapter on transformers' model with the same logits, nibble loads it back, and one step's gradients equal
transformers + PEFT's. (The two hybrid families add Gated DeltaNet layers and a gated shared expert, which stays
frozen: PEFT reads every ``*.gate_proj`` target of these models as the experts'.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import right_padded_batch
from nibble.errors import NibbleError
from nibble.io.peft import adapter_config, load_adapter, save_adapter
from nibble.model import load_model
from nibble.model.moe import sparse_blocks
from nibble.nn.lora import apply_lora, expert_lora_layers, lora_layers

# Qwen3-MoE and Qwen3-Next with a dense first layer; every layer of Qwen3.5-MoE is sparse.
FAMILIES = {"qwen3_moe": {"mlp_only_layers": [0]}, "qwen3_next": {"mlp_only_layers": [0]}, "qwen3_5_moe_text": {}}


@pytest.fixture(scope="module", params=list(FAMILIES))
def moe(shared_checkpoint, request):
    return shared_checkpoint(request.param, **FAMILIES[request.param])


def _sparse_paths(model):
    return [path for path, m in model.named_modules() if m in set(sparse_blocks(model))]


def _randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.2, generator=gen)
        for layer in expert_lora_layers(model).values():
            layer.lora_B.normal_(0, 0.2, generator=gen)


def _adapted(path, targets="all-linear"):
    model = load_model(path)
    wrapped = apply_lora(model, targets, rank=4, alpha=8.0)
    _randomize(model)
    return model, wrapped


def _save(model, directory, targets):
    from nibble.nn.lora import resolve_targets

    config = adapter_config(
        base_model=None,
        targets=list(resolve_targets(targets)),
        rank=4,
        alpha=8.0,
        dropout=0.05,
        use_rslora=False,
        task="causal_lm",
    )
    save_adapter(model, directory, config)
    return json.loads((directory / "adapter_config.json").read_text())


def test_all_linear_adapts_attention_and_experts(moe):
    model, wrapped = _adapted(moe[0])
    sparse = _sparse_paths(model)
    assert f"{sparse[0]}.experts.gate_up_proj" in wrapped and "model.layers.1.self_attn.o_proj" in wrapped
    if model.config.is_hybrid:
        deltanet = "in_proj_qkvz" if model.config.linear_fused_projections else "in_proj_qkv"
        assert f"model.layers.0.linear_attn.{deltanet}" in wrapped
    # PEFT reads gate_proj on a MoE model as the experts': a dense layer's SwiGLU, the shared expert, the router and
    # the shared expert's gate are not targets
    assert not [p for p in wrapped if ".mlp." in p and ".mlp.experts." not in p]
    experts = expert_lora_layers(model)[f"{sparse[0]}.experts.down_proj"]
    assert experts.lora_A.shape == (4, 4, 64) and experts.lora_B.shape == (4, 64, 4)


def test_dense_mlp_names_on_a_moe_model_are_refused(moe, shared_checkpoint):
    with pytest.raises(NibbleError, match="PEFT reads these names as the experts'"):
        apply_lora(load_model(moe[0]), "q_proj,gate_proj")
    with pytest.raises(NibbleError, match="this model has none"):
        apply_lora(load_model(shared_checkpoint()[0]), "experts")


@pytest.mark.parametrize("targets,router", [("all-linear", False), ("q_proj,experts", True)])
def test_peft_loads_the_adapter_with_the_same_logits(moe, tmp_path, targets, router):
    from peft import PeftModel

    path, hf = moe
    model, _ = _adapted(path, targets)
    if router:  # a trained router travels whole, as PEFT's modules_to_save
        for block in sparse_blocks(model):
            block.gate.weight.requires_grad_(True)
            with torch.no_grad():
                block.gate.weight.mul_(-2.0)
    config = _save(model, tmp_path, targets)
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert config["lora_dropout"] == 0.0
    assert config["modules_to_save"] == (["mlp.gate"] if router else None)
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path).eval()  # unload would keep a trained router
    ids, mask = right_padded_batch([7, 4], seed=5)
    with torch.no_grad():
        ours = model(ids, mask)
        theirs = peft(input_ids=ids, attention_mask=mask).logits
        plain = load_model(path)(ids, mask)

    real = mask.bool()
    assert (ours[real] - plain[real]).abs().max() > 1e-2  # the adapter changes the logits
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-4, rtol=0)

    again = load_model(path)
    load_adapter(again, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids, mask), ours, atol=0, rtol=0)


def _close(got, want):
    """Equal up to fp32 summation order, relative to the gradient's scale (the delta rule's chunked form and
    transformers' sum in other orders)."""
    torch.testing.assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)


def test_one_step_gradients_equal_transformers_and_peft(moe, tmp_path):
    from peft import PeftModel

    path, hf = moe
    model, _ = _adapted(path)
    for block in sparse_blocks(model):  # the router trains too (--train-router)
        block.gate.weight.requires_grad_(True)
    _save(model, tmp_path, "all-linear")
    peft = PeftModel.from_pretrained(copy.deepcopy(hf), tmp_path, is_trainable=True)
    ids, mask = right_padded_batch([6, 6], seed=6)
    labels = ids.masked_fill(mask == 0, -100)
    logits = model(ids, mask)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
    loss.backward()
    ref = peft(input_ids=ids, attention_mask=mask, labels=labels).loss
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=0)
    theirs = {n.replace(".default", ""): p.grad for n, p in peft.named_parameters() if p.requires_grad}
    e = 4
    for path_, layer in expert_lora_layers(model).items():
        parent, name = path_.rsplit(".", 1)
        inner = "base_layer." if name == "gate_up_proj" else ""
        grad_a = theirs[f"base_model.model.{parent}.{inner}lora_A.weight"].view(e, 4, -1)
        grad_b = theirs[f"base_model.model.{parent}.{inner}lora_B.weight"].view(-1, 4, e).permute(2, 0, 1)
        _close(layer.lora_A.grad, grad_a)
        _close(layer.lora_B.grad, grad_b)
    for path_, block in zip(_sparse_paths(model), sparse_blocks(model), strict=True):
        grad = theirs[f"base_model.model.{path_}.gate.modules_to_save.weight"]
        assert grad.abs().max() > 0
        _close(block.gate.weight.grad, grad)
    for path_, layer in lora_layers(model).items():
        _close(layer.lora_A.weight.grad, theirs[f"base_model.model.{path_}.lora_A.weight"])
