"""One rank of a 4-bit base sharded by FSDP2 (see nibble.train.distributed.shard_model), checked against the same
model unsharded; started by torchrun from tests/train/test_sharded_base.py.

usage: torchrun --nproc-per-node N tests/sharded_base.py MODEL_DIR OUT_DIR

For each format (NF4, NF4 with double quantization, INT4) every rank loads the model with LoRA on all seven
projections, computes its logits and its dequantized weights, shards it, and asserts that:
- the 4-bit tensors stay uint8 parameters, sharded (DTensors) outside a forward: resharded after it;
- the logits of a forward over the sharded model are exactly the unsharded ones;
- gathered, every layer's weight rebuilt over the gathered bytes dequantizes exactly to the unsharded weight;
- gathering the trainable parameters alone (an adapter export) leaves the base sharded;
- with the adapters off (``model.adapters_disabled()``) the sharded model computes its base exactly, and so does
  a model replicated by DDP, whose adapters get the gradients of the adapted pass alone.
It writes ``OUT_DIR/rank-R.json``: per format, the bytes of the 4-bit tensors this rank holds and in all.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from nibble.model import load_model
from nibble.nn import QuantLinear
from nibble.nn.lora import LoRALinear, lora_layers
from nibble.quant import QuantSpec
from nibble.train import distributed
from nibble.train.config import TrainConfig
from nibble.train.run import prepare_model

SPECS = {
    "nf4": QuantSpec("nf4"),
    "nf4+dq": QuantSpec("nf4", double_quant=True),
    "int4": QuantSpec("int4", group_size=64),
}


def check(model_dir: Path, spec: QuantSpec) -> dict[str, int]:
    torch.manual_seed(0)
    model = load_model(model_dir, task="classify", num_labels=2, quantize=spec)
    prepare_model(model, TrainConfig(method="qlora", lora_targets="all-linear"))
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    dense = {name: m.dequantize() for name, m in layers.items()}
    adapters = {
        name: m.lora_B.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, LoRALinear)
    }
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(ids, mask)

    distributed.shard_model(model, torch.device("cpu"))
    held = {name: p for name, p in model.named_parameters() if ".held_" in name}
    assert held and all(isinstance(p, DTensor) and p.dtype == torch.uint8 for p in held.values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask), logits, rtol=0, atol=0)
    block = layers["model.layers.0.self_attn.q_proj.base_layer"]
    assert isinstance(block.held_packed, DTensor)  # freed (resharded) after the block's forward

    with distributed.gathered(model, trainable_only=True):
        assert all(isinstance(p, DTensor) for name, p in model.named_parameters() if ".held_" in name)
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                assert not isinstance(m.lora_B.weight, DTensor)
                assert torch.equal(m.lora_B.weight, adapters[name]), name
    with distributed.gathered(model):
        for name, m in layers.items():
            assert m.held_packed.dtype == torch.uint8 and not isinstance(m.held_packed, DTensor)
            torch.testing.assert_close(m.dequantize(), dense[name], rtol=0, atol=0)
    return {
        "local": sum(p.to_local().numel() for p in held.values()),  # uint8: one byte per element
        "total": sum(p.numel() for p in held.values()),
        "packed_local": sum(p.to_local().numel() for name, p in held.items() if name.endswith(".held_packed")),
        "packed_total": sum(p.numel() for name, p in held.items() if name.endswith(".held_packed")),
    }


def randomize_adapters(model: torch.nn.Module) -> None:
    """Nonzero B (the same on every rank), so that the adapters change the logits."""
    torch.manual_seed(2)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.2)


def check_sharded_adapters_off(model_dir: Path) -> None:
    """A sharded QLoRA model with the adapters off computes its base exactly; with them on, something else."""
    torch.manual_seed(0)
    model = load_model(model_dir, quantize=QuantSpec("nf4"))
    prepare_model(model, TrainConfig(method="qlora", lora_targets="all-linear"))
    ids = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        base_logits = model(ids, mask)  # the adapters' B is zero: exactly the base
        randomize_adapters(model)
        distributed.shard_model(model, torch.device("cpu"))
        with model.adapters_disabled():
            torch.testing.assert_close(model(ids, mask), base_logits, rtol=0, atol=0)
        assert not torch.allclose(model(ids, mask), base_logits, atol=1e-3)


def check_data_parallel(model_dir: Path) -> None:
    """DDP over a QLoRA model whose forward also runs a reference pass with the adapters off (no gradients): the
    reference is the base, and the adapters' gradients are those of the adapted pass alone."""
    torch.manual_seed(0)
    model = load_model(model_dir, quantize=QuantSpec("nf4"))
    prepare_model(model, TrainConfig(method="qlora", lora_dropout=0.0))
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        base_logits = model(ids, batch["attention_mask"])
    randomize_adapters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(model(ids, batch["attention_mask"]).square().mean(), params)

    def forward(m, b):
        with torch.no_grad(), m.adapters_disabled():
            reference = m(b["input_ids"], b["attention_mask"])
        return m(b["input_ids"], b["attention_mask"]), reference

    adapted, reference = distributed.DataParallel(model, forward)(batch)
    torch.testing.assert_close(reference, base_logits, rtol=0, atol=0)
    adapted.square().mean().backward()  # the ranks' equal gradients, averaged
    for p, want in zip(params, expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=0, atol=0)


def main() -> None:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    part = distributed.from_environment()
    distributed.start(part, torch.device("cpu"), "gloo")
    try:
        sizes = {name: check(model_dir, spec) for name, spec in SPECS.items()}
        check_sharded_adapters_off(model_dir)
        check_data_parallel(model_dir)
        (out / f"rank-{part.rank}.json").write_text(json.dumps(sizes))
        distributed.barrier()
    finally:
        distributed.stop()


if __name__ == "__main__":
    main()
