"""Memory arithmetic: weight sizes equal what a loaded model holds; the Qwen3-4B shape gives the known sizes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import nibble
from nibble.cli.main import main
from nibble.errors import NibbleError
from nibble.model import ModelConfig
from nibble.model.memory import PlanOptions, dense_copies, format_rows, plan_rows, projections_bytes, weight_bytes
from nibble.nn import QuantLinear
from nibble.nn.quant_linear import cache_budget_bytes, cache_dense_weights
from nibble.quant import QuantSpec

QWEN3_4B = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    tie_word_embeddings=True,
)


@pytest.mark.parametrize(
    "spec",
    [QuantSpec("nf4"), QuantSpec("nf4", double_quant=True), QuantSpec("int4", group_size=64), QuantSpec(blocksize=256)],
)
def test_projection_bytes_equal_a_loaded_model(shared_checkpoint, spec):
    path, _ = shared_checkpoint("qwen3")
    model = nibble.load_model(path, quantize=spec)
    held = sum(m.qweight.memory_bytes() for m in model.modules() if isinstance(m, QuantLinear))
    assert projections_bytes(model.config, spec) == held


def test_dense_rows_equal_a_loaded_model(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    model = nibble.load_model(path)
    rows = {name: (params, sizes) for name, params, sizes in format_rows(model.config)}
    total = sum(p.numel() for p in model.parameters())  # tied weights count once
    assert rows["all weights"] == (total, {"fp32": 4 * total, "bf16": 2 * total, "nf4": None, "nf4+dq": None,
                                           "int4": None})  # fmt: skip
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert rows["norms"][0] == norms


def test_qwen3_4b_shape_gives_the_known_sizes():
    config = ModelConfig(**QWEN3_4B)
    assert projections_bytes(config, "fp32") == 3_633_315_840 * 4  # 14.5 GB
    assert 2.0e9 < projections_bytes(config, QuantSpec("nf4")) < 2.1e9
    rows = {name: sizes for name, _, sizes in format_rows(config)}
    assert 16.0e9 < rows["all weights"]["fp32"] < 16.2e9
    plan = {name: size for name, _, size in plan_rows(config, PlanOptions())}
    assert plan["block projections, frozen [nf4]"] == projections_bytes(config, QuantSpec("nf4"))
    lora = 16 * (4096 + 2560 + 1024 + 2560) * 36  # r * (in + out) for q_proj and v_proj, every layer
    assert plan["LoRA r=16 on q_proj,v_proj [fp32]"] == 4 * lora
    assert plan["AdamW state (2 x fp32)"] == 8 * lora
    assert plan["total, with checkpointing"] < plan["total, no checkpointing"]


def test_int4_needs_divisible_group_and_options_are_checked():
    assert weight_bytes(8, 256, QuantSpec("int4", group_size=128)) == 8 * 128 + 8 * 2 * 2
    with pytest.raises(NibbleError, match="not divisible by INT4 group_size 128"):
        weight_bytes(8, 96, QuantSpec("int4"))
    with pytest.raises(NibbleError, match="LoRA targets"):
        PlanOptions(lora_targets=("qkv",))
    with pytest.raises(NibbleError, match="method 'dpo'"):
        PlanOptions(method="dpo")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_plan_counts_the_dense_copies_a_run_makes(shared_checkpoint, capsys, dtype):
    path, _ = shared_checkpoint("qwen3", num_hidden_layers=4)
    model = nibble.load_model(path, quantize="nf4", dtype=dtype)
    made = cache_dense_weights(model, cache_budget_bytes(model, dtype), dtype)
    name = str(dtype).removeprefix("torch.")
    opts = PlanOptions(method="qlora", dtype=name, device="cpu")
    assert dense_copies(model.config, opts) == made and 0 < made[0] < made[1]
    assert dense_copies(model.config, replace(opts, device="cuda")) == (0, made[1], 0)  # none by default on GPUs
    assert dense_copies(model.config, opts, limit=made[2] // 2)[0] < made[0]  # a planned run's budget bounds them
    assert main(["plan", "--model", str(path), "--dtype", name, "--device", "cpu"]) == 0
    assert f"dense copies of {made[0]}/{made[1]} frozen 4-bit weights [{name}]" in capsys.readouterr().out
