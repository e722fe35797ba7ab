"""LoRALinear against PEFT's LoRA layer: same forward, same gradients, same scaling; targets; merge."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from nibble.errors import NibbleError
from nibble.nn import LoRALinear, QuantLinear, apply_lora
from nibble.nn.lora import (
    PROJECTIONS,
    RECOMPUTE_MIN_ELEMENTS,
    DropoutKeys,
    LoRADropout,
    dropout_keys,
    lora_layers,
)
from nibble.quant import QuantSpec


class Block(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.q_proj = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.q_proj.weight.copy_(weight)
            if bias is not None:
                self.q_proj.bias.copy_(bias)

    def forward(self, x):
        return self.q_proj(x)


class FixedMask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


def peft_twin(ours: LoRALinear, weight: torch.Tensor, bias: torch.Tensor | None, dropout: float):
    """A PEFT-wrapped nn.Linear holding ``weight``/``bias`` and our A/B."""
    config = LoraConfig(
        r=ours.rank,
        lora_alpha=ours.alpha,
        lora_dropout=dropout,
        target_modules=["q_proj"],
        use_rslora=ours.use_rslora,
    )
    model = get_peft_model(Block(weight, bias), config)
    layer = model.base_model.model.q_proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A.weight)
        layer.lora_B["default"].weight.copy_(ours.lora_B.weight)
    return model, layer


@pytest.mark.parametrize("rank,alpha,rslora", [(4, 8.0, False), (8, 16.0, True), (3, 5.0, False)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_forward_and_gradients_equal_peft(rank, alpha, rslora, bias, dropout):
    torch.manual_seed(0)
    weight, b = torch.randn(45, 64) * 0.1, (torch.randn(45) if bias else None)
    base = nn.Linear(64, 45, bias=bias)
    with torch.no_grad():
        base.weight.copy_(weight)
        if bias:
            base.bias.copy_(b)
    ours = LoRALinear(base, rank, alpha, dropout, use_rslora=rslora)
    with torch.no_grad():
        ours.lora_B.weight.normal_()  # B starts at zero; a non-zero B makes the check meaningful
    theirs_model, theirs = peft_twin(ours, weight, b, dropout)
    assert ours.scaling == theirs.scaling["default"]
    assert ours.scaling == (alpha / math.sqrt(rank) if rslora else alpha / rank)
    ours.train(), theirs_model.train()

    x = torch.randn(2, 7, 64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    if dropout:
        # PEFT applies nn.Dropout; give it the very mask ours draws, so the rest of the math is compared exactly.
        torch.manual_seed(1)
        theirs.lora_dropout["default"] = FixedMask(ours.lora_dropout.mask(x))
    torch.manual_seed(1)
    y1 = ours(x1)
    y2 = theirs_model(x2)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    g = torch.randn_like(y1)
    y1.backward(g), y2.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.lora_A.weight.grad, theirs.lora_A["default"].weight.grad, rtol=0, atol=0)
    torch.testing.assert_close(ours.lora_B.weight.grad, theirs.lora_B["default"].weight.grad, rtol=0, atol=0)
    assert ours.base_layer.weight.grad is None


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of ``fn()``."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_dropout_keeps_no_more_for_backward_than_no_dropout():
    """A large dropped input and its mask are recomputed in the backward, not kept (8 bytes per input element)."""
    torch.manual_seed(0)
    x = torch.randn(RECOMPUTE_MIN_ELEMENTS // 64, 64, requires_grad=True)
    kept = {}
    for p in (0.0, 0.1):
        layer = LoRALinear(nn.Linear(64, 32), 4, 8.0, p).train()
        kept[p] = saved_bytes(lambda: layer(x))  # noqa: B023
    assert kept[0.1] <= kept[0.0] + 4096  # the saved RNG state, not two more tensors like x (2 MiB)

    # ... and the recomputed mask is the one the forward drew: outputs and gradients equal the plain expression.
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    torch.manual_seed(1)
    y = layer(x)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.lora_A.weight, layer.lora_B.weight), g)
    torch.manual_seed(1)
    mask = layer.lora_dropout.mask(x)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected_y = layer.base_layer(x) + ((x * mask) @ a.T) @ b.T * layer.scaling
    torch.testing.assert_close(y, expected_y, rtol=0, atol=0)
    expected = torch.autograd.grad(expected_y, (x, a, b), g)
    for ours, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.05, 0.25, 0.5])
def test_dropout_drops_p_of_the_inputs_and_keeps_the_mean(p):
    drop = LoRADropout(p).train()
    assert abs(drop.p - p) <= 0.5 / 65536
    torch.manual_seed(0)
    x = torch.ones(400, 500)
    first, second = drop(x), drop(x)
    assert first.unique().tolist() == [0.0, pytest.approx(1 / (1 - drop.p))]
    dropped = (first == 0).float().mean().item()
    assert abs(dropped - p) < 4 * math.sqrt(p * (1 - p) / x.numel())  # 4 sigma
    assert abs(first.mean().item() - 1.0) < 4 * math.sqrt(p / (1 - p) / x.numel())
    assert not torch.equal(first, second)  # a fresh mask every call
    for column in range(4):  # every 16-bit lane of a 64-bit draw is used alike
        lane = (first.view(-1)[: 4 * 40000].view(-1, 4)[:, column] == 0).float().mean().item()
        assert abs(lane - p) < 5 * math.sqrt(p * (1 - p) / 40000)
    assert drop.eval()(x) is x


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_keyed_dropout_drops_p_per_row_and_recomputes_the_same_mask(p):
    """Masks drawn from per-row keys: p of the elements dropped, every lane alike, rows independent of each other
    and of the salt; the same keys give the same mask, and a large input's recomputed mask is the forward's."""
    drop = LoRADropout(p).train()
    keys = torch.arange(400, dtype=torch.int64) * 7919
    x = torch.ones(400, 500)
    first = drop.mask(x, keys)
    assert torch.equal(first, drop.mask(x, keys.clone()))  # counter-based: nothing but the keys
    assert torch.equal(first[5:9], drop.mask(x[:4], keys[5:9]))  # a row's mask is its key's alone
    dropped = (first == 0).float().mean().item()
    assert abs(dropped - p) < 4 * math.sqrt(p * (1 - p) / x.numel())
    for column in range(4):
        lane = (first.view(-1, 4)[:, column] == 0).float().mean().item()
        assert abs(lane - p) < 5 * math.sqrt(p * (1 - p) / (x.numel() / 4))
    agree = (first == drop.mask(x, keys ^ 1)).float().mean().item()  # another salt: independent masks
    assert abs(agree - (p * p + (1 - p) ** 2)) < 5 * math.sqrt(0.25 / x.numel())

    layer = LoRALinear(nn.Linear(64, 32), 4, 8.0, p).train()
    layer.lora_dropout.salt = 123
    with torch.no_grad():
        layer.lora_B.weight.normal_()
    x = torch.randn(RECOMPUTE_MIN_ELEMENTS // 64, 64, requires_grad=True)
    source = DropoutKeys(
        torch.randint(0, 99, (x.shape[0],)),
        torch.zeros(x.shape[0], dtype=torch.long),
        torch.arange(x.shape[0]),
        torch.tensor([x.shape[0] - 1]),
    )
    with dropout_keys(source):
        y = layer(x)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.lora_A.weight), g)  # the backward recomputes the mask, outside the context
    mask = layer.lora_dropout.mask(x, source.tokens ^ 123)
    a, b = layer.lora_A.weight, layer.lora_B.weight
    expected_y = layer.base_layer(x) + ((x * mask) @ a.T) @ b.T * layer.scaling
    torch.testing.assert_close(y, expected_y, rtol=0, atol=0)
    for ours, theirs in zip(got, torch.autograd.grad(expected_y, (x, a), g), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", ["nf4", "int4"])
def test_quantized_base_equals_peft_on_dequantized_weight(fmt):
    torch.manual_seed(0)
    weight = torch.randn(96, 128) * 0.1
    qbase = QuantLinear.from_dense(weight, spec=QuantSpec(fmt, group_size=64))
    ours = LoRALinear(qbase, 8, 16.0)
    with torch.no_grad():
        ours.lora_B.weight.normal_()
    theirs_model, theirs = peft_twin(ours, qbase.dequantize(), None, 0.0)
    x1 = torch.randn(5, 128, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = ours(x1), theirs_model(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-6, atol=1e-6)
    y1.square().sum().backward(), y2.square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.lora_A.weight.grad, theirs.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.lora_B.weight.grad, theirs.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)


def test_init_matches_lora_paper_and_peft():
    torch.manual_seed(3)
    ours = LoRALinear(nn.Linear(64, 32), 8, 16.0)
    assert torch.count_nonzero(ours.lora_B.weight) == 0
    # Kaiming-uniform with a=sqrt(5) on fan_in=64 draws from U(-1/8, 1/8): same RNG stream as PEFT's init.
    torch.manual_seed(3)
    expected = torch.empty(8, 64)
    nn.Linear(64, 32)  # the base layer's draws come first
    nn.init.kaiming_uniform_(expected, a=math.sqrt(5))
    torch.testing.assert_close(ours.lora_A.weight, expected, rtol=0, atol=0)
    assert ours.lora_A.weight.abs().max() <= 1 / 8


def test_autocast_bf16_keeps_fp32_adapter_weights():
    torch.manual_seed(0)
    ours = LoRALinear(QuantLinear.from_dense(torch.randn(64, 64) * 0.1), 4, 8.0)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert ours.lora_A.weight.dtype == torch.float32 and ours.lora_A.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("quantized", [False, True])
def test_merged_weight_computes_what_the_adapted_layer_computes(quantized):
    torch.manual_seed(0)
    base = QuantLinear.from_dense(torch.randn(48, 64) * 0.1) if quantized else nn.Linear(64, 48, bias=False)
    ours = LoRALinear(base, 4, 8.0)
    with torch.no_grad():
        ours.lora_B.weight.normal_()
    dense = base.dequantize() if quantized else base.weight.detach()
    torch.testing.assert_close(ours.merged_weight(), dense + ours.delta_weight(), rtol=0, atol=0)
    x = torch.randn(2, 64)
    torch.testing.assert_close(x @ ours.merged_weight().T, ours(x), rtol=1e-5, atol=1e-5)


def tiny_qwen3():
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "targets,expected",
    [("q_proj,v_proj", ("q_proj", "v_proj")), (["o_proj"], ("o_proj",)), ("all-linear", PROJECTIONS)],
)
def test_apply_lora_targets_by_name(targets, expected):
    model = tiny_qwen3()
    paths = apply_lora(model, targets, rank=2, alpha=4)
    assert len(paths) == 2 * len(expected)
    assert {p.rsplit(".", 1)[1] for p in paths} == set(expected)
    assert "lm_head" not in " ".join(paths)
    assert set(lora_layers(model)) == set(paths)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n}
    assert trainable == {f"{p}.lora_{ab}.weight" for p in paths for ab in "AB"}


def test_unknown_target_names_what_exists():
    with pytest.raises(NibbleError, match="no linear layer named qkv.*q_proj"):
        apply_lora(tiny_qwen3(), "qkv")


def test_bad_arguments_are_user_errors():
    with pytest.raises(NibbleError, match="lora_rank"):
        LoRALinear(nn.Linear(4, 4), 0)
    with pytest.raises(NibbleError, match="lora_dropout"):
        LoRALinear(nn.Linear(4, 4), 2, dropout=1.0)
    with pytest.raises(NibbleError, match="all-linear"):
        apply_lora(tiny_qwen3(), "all-linear,q_proj")
