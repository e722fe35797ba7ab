"""``with model.adapters_disabled():`` the model is its base: logits equal the base model's loaded on its own, no
gradient reaches an adapter through that pass, and the adapters come back on after it (LoRA and QLoRA). Under
FSDP2 (--shard-base) and DDP: tests/sharded_base.py, started by tests/train/test_distributed.py."""

from __future__ import annotations

import pytest
import torch

from nibble.model import load_model
from nibble.nn import apply_lora
from nibble.nn.lora import lora_layers


@pytest.mark.parametrize("quantize", [None, "nf4"], ids=["lora", "qlora"])
def test_adapters_off_computes_the_base_and_trains_nothing(shared_checkpoint, quantize):
    path, _ = shared_checkpoint("qwen3")
    base = load_model(path, quantize=quantize)
    model = load_model(path, quantize=quantize)
    apply_lora(model, "all-linear", rank=4, alpha=8.0)
    torch.manual_seed(0)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)  # (B starts at zero: the adapters must change the logits)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = base(ids, mask)

    adapted = model(ids, mask)
    with model.adapters_disabled():
        reference = model(ids, mask)
    assert torch.equal(reference, expected)
    assert not torch.allclose(adapted, expected, atol=1e-3)
    assert torch.equal(model(ids, mask), adapted)  # on again after the block

    params = [p for p in model.parameters() if p.requires_grad]
    alone = torch.autograd.grad(adapted.square().mean(), params, retain_graph=True)
    both = torch.autograd.grad(adapted.square().mean() + reference.square().mean(), params, allow_unused=True)
    assert not reference.requires_grad
    for a, b in zip(alone, both, strict=True):
        assert torch.equal(a, b)
