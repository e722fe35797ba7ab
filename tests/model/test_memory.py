"""Memory arithmetic: weight sizes equal what a loaded model holds; the Qwen3-4B shape gives the known sizes."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import nibble
from helpers import plan_opts
from nibble.cli.main import main
from nibble.errors import NibbleError
from nibble.model import ModelConfig
from nibble.model.memory import dense_copies, format_rows, plan_rows, projections_bytes, weight_bytes
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
    plan = {name: size for name, _, size in plan_rows(config, plan_opts(config, task="instruct", lora_rank=16))}
    assert plan["block projections, frozen [nf4]"] == projections_bytes(config, QuantSpec("nf4"))
    lora = 16 * (4096 + 2560 + 1024 + 2560) * 36  # r * (in + out) for q_proj and v_proj, every layer
    assert plan["LoRA r=16 on q_proj,v_proj [fp32]"] == 4 * lora
    assert plan["AdamW state (2 x fp32)"] == 8 * lora
    assert plan["total, with checkpointing"] < plan["total, no checkpointing"]


def test_int4_needs_divisible_group_and_options_are_checked():
    assert weight_bytes(8, 256, QuantSpec("int4", group_size=128)) == 8 * 128 + 8 * 2 * 2
    with pytest.raises(NibbleError, match="96 is not divisible by INT4 group_size 128; use --group-size 32$"):
        weight_bytes(8, 96, QuantSpec("int4"))
    config = ModelConfig(**QWEN3_4B)
    opts = plan_opts(config)
    with pytest.raises(NibbleError, match="LoRA targets"):
        replace(opts, lora_targets=("qkv",))
    with pytest.raises(NibbleError, match="method 'dpo'"):
        replace(opts, method="dpo")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_plan_counts_the_dense_copies_a_run_makes(shared_checkpoint, capsys, dtype):
    path, _ = shared_checkpoint("qwen3", num_hidden_layers=4)
    model = nibble.load_model(path, quantize="nf4", dtype=dtype)
    made = cache_dense_weights(model, cache_budget_bytes(model, dtype), dtype)
    name = str(dtype).removeprefix("torch.")
    opts = plan_opts(model.config, method="qlora", dtype=name, device="cpu")
    assert dense_copies(model.config, opts) == made and 0 < made[0] < made[1]
    assert dense_copies(model.config, replace(opts, device="cuda")) == (0, made[1], 0)  # none by default on GPUs
    assert dense_copies(model.config, opts, limit=made[2] // 2)[0] < made[0]  # a planned run's budget bounds them
    assert main(["plan", "--model", str(path), "--dtype", name, "--device", "cpu"]) == 0
    assert f"dense copies of {made[0]}/{made[1]} frozen 4-bit weights [{name}]" in capsys.readouterr().out


def saved_bytes(model: torch.nn.Module, layers: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of the tensors autograd saves in a training forward of the first ``layers`` blocks over 8 rows of
    ``tokens // 8`` tokens (each storage once; the model's own weights are not activations)."""
    from nibble.devices import autocast

    blocks = model.model.layers
    model.model.layers = blocks[:layers]
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    weights |= {v.untyped_storage().data_ptr() for m in model.modules() for v in vars(m).values() if torch.is_tensor(v)}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = max(seen.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    ids = torch.randint(3, 200, (8, tokens // 8), generator=torch.Generator().manual_seed(0))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(torch.device("cpu"), dtype):
            model(ids, torch.ones_like(ids))
    finally:
        model.model.layers = blocks
    return sum(seen.values())


@pytest.mark.cpu_bf16  # attention keeps fp32 tensors where a CPU without native bf16 runs it on fp32 units
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "method,targets,dropout",
    [("qlora", "q_proj,v_proj", 0.05), ("qlora", "q_proj,v_proj", 0.0), ("lora", "all-linear", 0.05), ("full", "", 0)],
)
def test_block_activations_are_what_autograd_saves(shared_checkpoint, method, targets, dropout, dtype):
    """The planner's bytes per block and token against saved-tensor hooks: the growth from 2 to 4 blocks and from
    1,024 to 2,048 tokens, which cancels every per-layer constant (autocast's weight casts) and the layers
    around the blocks."""
    from nibble.model.memory import block_activation_bytes

    path, _ = shared_checkpoint("qwen3", num_labels=3, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
    torch.manual_seed(0)
    compute = getattr(torch, dtype)
    base = torch.float32 if method == "full" else compute
    model = nibble.load_model(path, task="classify", num_labels=3, quantize="nf4" if method == "qlora" else None,
                              dtype=base)  # fmt: skip
    if method == "full":
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith("model.embed_tokens."))
    else:
        nibble.nn.apply_lora(model, targets, rank=8, dropout=dropout)
        cache_dense_weights(model, 2**30, compute)
    model.score.float().weight.requires_grad_(True)
    model.train()
    s = {(n, t): saved_bytes(model, n, t, compute) for n in (2, 4) for t in (1024, 2048)}
    measured = (s[4, 2048] - s[2, 2048] - s[4, 1024] + s[2, 1024]) / (2 * 1024)
    opts = plan_opts(
        model.config,
        task="classify",
        num_labels=3,
        method=method,
        dtype=dtype,
        lora_dropout=dropout,
        lora_targets=targets or "q_proj",
        lora_rank=16,
        max_seq_len=256,  # the longest rows measured: a native-bf16 CPU attends over them on fp32 units too
    )
    assert block_activation_bytes(model.config, opts) == pytest.approx(measured, rel=0.1)
