"""The planner against a Qwen3-8B-shaped QLoRA step at 8 x 2048 tokens, run on fake tensors (nothing allocated):
the bytes of live tensors at the step's peak, counted op by op, against ``plan_rows`` for the same run."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from nibble import kernels
from nibble.data.instruct import collate_lm
from nibble.devices import autocast
from nibble.model import DecoderModel, ModelConfig
from nibble.model.memory import plan_rows
from nibble.nn.quant_linear import QuantLinear
from nibble.quant.nf4 import NF4Weight
from nibble.train import TrainConfig
from nibble.train.planning import plan_options
from nibble.train.run import prepare_model
from nibble.train.tasks.lm import lm_forward, lm_loss

QWEN3_8B = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=4096,
    intermediate_size=12288,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    qk_norm=True,
    tie_word_embeddings=False,
)


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages alive (those added, and every op's outputs), and their peak."""

    def __init__(self):
        super().__init__()
        self.alive: set[int] = set()
        self.live = self.peak = 0

    def add(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor):
            return
        storage = tensor.untyped_storage()
        if id(storage) in self.alive:
            return
        self.alive.add(id(storage))
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._freed, id(storage), storage.nbytes())

    def _freed(self, key: int, size: int) -> None:
        self.alive.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            self.add(tensor)
        return out


def nf4(out_features: int, in_features: int, device: torch.device) -> NF4Weight:
    """An NF4 weight's tensors, uninitialized (on fake or meta tensors nothing is computed)."""
    packed = torch.empty(out_features * in_features // 2, dtype=torch.uint8, device=device)
    return NF4Weight(packed, torch.empty(out_features * in_features // 64, device=device), (out_features, in_features),
                     torch.bfloat16)  # fmt: skip


@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_qwen3_8b_qlora_step_peaks_near_the_plan(checkpointing):
    config = ModelConfig(**QWEN3_8B)
    rows, seq = 8, 2048
    run = dict(method="qlora", task="instruct", dtype="bfloat16", batch_size=rows, max_seq_len=seq, cache_budget_mb=0)
    cfg = TrainConfig(model="m", data="d", output="o", gradient_checkpointing=checkpointing, **run)
    # Built on the meta device (random init cannot run on fake tensors), then given fake storage on the CPU: fake
    # CUDA tensors need a CUDA build for some ops. So this is the CPU's code path, planned for the CPU.
    meta, cpu = torch.device("meta"), torch.device("cpu")
    with meta:
        model = DecoderModel(config, "causal_lm", dtype=torch.bfloat16)
    model.requires_grad_(False)
    for layer in model.model.layers:
        for group in (layer.self_attn, layer.mlp):
            for name, child in list(group.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(group, name, QuantLinear(nf4(*child.weight.shape, meta)))
    prepare_model(model, cfg)
    model.gradient_checkpointing = checkpointing
    ids = [[(7 * i + j) % 150000 + 1 for j in range(seq)] for i in range(rows)]
    shapes = {key: (value.shape, value.dtype) for key, value in collate_lm(ids, ids, 0).items()}
    tracker = LiveBytes()
    with FakeTensorMode(allow_non_fake_inputs=True), kernels.use_backend("torch"):
        model.to_empty(device=cpu).train()
        for module in model.modules():
            if isinstance(module, QuantLinear):
                module.qweight = nf4(*module.qweight.shape, cpu)
                tracker.add(module.qweight.packed), tracker.add(module.qweight.absmax)
        batch = {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in shapes.items()}
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        for tensor in model.parameters():
            tracker.add(tensor)
        weights = tracker.live
        for tensor in batch.values():
            tracker.add(tensor)
        with tracker:
            with autocast(cpu, torch.bfloat16):
                outputs = lm_forward(model, batch)
            lm_loss(outputs).backward()
            del outputs
            optimizer.step()
    plan = plan_rows(config, plan_options(cfg, config, num_labels=None, device=cpu))
    slack = sum(size for name, _, size in plan if name.startswith("CPU runtime"))  # (what live tensors do not hold)
    estimate = plan[-1 if checkpointing else -2][2] - slack
    held = ("embeddings", "lm_head", "block projections", "norms", "LoRA")
    planned_weights = sum(size for name, _, size in plan if name.startswith(held))
    assert weights == planned_weights  # embeddings, head, NF4 projections, norms, LoRA
    print(f"checkpointing={checkpointing}: estimate {estimate / 1e9:.2f} GB, tracked peak {tracker.peak / 1e9:.2f} GB")
    assert 0.6 < tracker.peak / estimate < 1.6, (tracker.peak / 1e9, estimate / 1e9)
