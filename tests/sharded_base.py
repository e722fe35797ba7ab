"""One rank of a 4-bit base sharded by FSDP2 (see nibble.train.distributed.shard_model), checked against the same
model unsharded; started by torchrun from tests/train/test_sharded_base.py.

usage: torchrun --nproc-per-node N tests/sharded_base.py MODEL_DIR OUT_DIR

For each format (NF4, NF4 with double quantization, INT4) every rank loads the model with LoRA on all seven
projections, computes its logits and its dequantized weights, shards it, and asserts that:
- the 4-bit tensors stay uint8 parameters, sharded (DTensors) outside a forward: resharded after it;
- the logits of a forward over the sharded model are exactly the unsharded ones;
- gathered, every layer's weight rebuilt over the gathered bytes dequantizes exactly to the unsharded weight;
- gathering the trainable parameters alone (an adapter export) leaves the base sharded.
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
from nibble.nn.lora import LoRALinear
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


def main() -> None:
    model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    part = distributed.from_environment()
    distributed.start(part, torch.device("cpu"), "gloo")
    try:
        sizes = {name: check(model_dir, spec) for name, spec in SPECS.items()}
        (out / f"rank-{part.rank}.json").write_text(json.dumps(sizes))
        distributed.barrier()
    finally:
        distributed.stop()


if __name__ == "__main__":
    main()
