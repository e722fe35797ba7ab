"""No tensor is created on a hard-coded device: a training step, an evaluation and generation run with every
parameter on the meta device, and every tensor any op produces must be on meta too.

A factory call without ``device=`` (``torch.arange(n)``, ``torch.zeros(...)``, ``torch.tensor([...])``) makes a
CPU tensor, which this test reports with the line of nibble code that made it; on a GPU the same call would
be a silent host round trip or a device-mismatch error. Reading a value (``.item()``, ``bool()``) from a meta
tensor is impossible, so those reads return 1 here, or False for a bool (which sends the attention mask down its
padding path), and ``nonzero`` finds every element non-zero.
Autocast knows no meta device: for meta tensors it stands in as off.
"""

from __future__ import annotations

import contextlib
import traceback
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import nibble
from helpers import label_task
from nibble import kernels
from nibble.data.batching import BatchStream, pad_sequences
from nibble.data.classify import ClassificationData
from nibble.data.instruct import IGNORE_INDEX, collate_lm
from nibble.io.runinfo import LabelMap
from nibble.model.generate import generate
from nibble.model.model import KVCache
from nibble.train.config import TrainConfig
from nibble.train.metrics import classification_loss
from nibble.train.run import prepare_model
from nibble.train.tasks.classify import evaluate
from nibble.train.tasks.lm import lm_forward, lm_loss
from nibble.train.trainer import Trainer

SRC = Path(nibble.__file__).resolve().parent
TINY_CONFIG = dict(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
TINY_CONFIG.update(num_key_value_heads=1, head_dim=4, model_type="llama")
META = torch.device("meta")


@pytest.fixture(autouse=True)
def autocast_off_on_meta(monkeypatch):
    is_enabled, autocast = torch.is_autocast_enabled, torch.autocast
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: False if a == ("meta",) else is_enabled(*a))
    monkeypatch.setattr(
        torch,
        "autocast",
        lambda kind, *a, **k: contextlib.nullcontext() if kind == "meta" else autocast(kind, *a, **k),
    )


class OffMetaTensors(TorchDispatchMode):
    """Records the line of nibble code that made a tensor off the meta device from nothing that was off it: a
    factory call (or ``torch.tensor``) without the device, not an op on host data (a batch before it moves)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            return False if args[0].dtype == torch.bool else 1
        if func is torch.ops.aten.nonzero.default and args[0].device == META:  # as if every element were non-zero
            return torch.empty(args[0].numel(), args[0].dim(), dtype=torch.long, device=META)
        if func is torch.ops.aten._to_copy.default and args[0].device == META and kwargs.get("device") is not None:
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)  # results to the host
        out = func(*args, **(kwargs or {}))
        made_off = any(isinstance(t, torch.Tensor) and t.device != META for t in tree_leaves(out))
        from_host = any(isinstance(t, torch.Tensor) and t.device != META for t in tree_leaves((args, kwargs)))
        if made_off and (func is torch.ops.aten.lift_fresh.default or not from_host):
            caller = next(f for f in reversed(traceback.extract_stack()) if not _machinery(f.filename))
            path = Path(caller.filename).resolve()
            # torch's own internals (torch.optim) are not nibble's to fix; HOST_SIDE works on the host by design.
            if path.is_relative_to(SRC) and not any(path.is_relative_to(SRC / h) for h in HOST_SIDE):
                self.found.append(f"{func}: {Path(caller.filename).name}:{caller.lineno}: {caller.line}")
        return out


TORCH = Path(torch.__file__).resolve().parent
# Code that works on the host by design: batches are built there (and moved once), metrics computed there.
HOST_SIDE = ("data", "train/metrics.py")
# Files between an op's caller and the mode: this test, and torch's dispatch and dynamo-disable wrappers.
_DISPATCH = {"_python_dispatch.py", "_ops.py", "_compile.py", "eval_frame.py"}


def _machinery(filename: str) -> bool:
    path = Path(filename).resolve()
    return path == Path(__file__).resolve() or (path.is_relative_to(TORCH) and path.name in _DISPATCH)


def meta_model(path, method: str, task: str, pooling: str = "last"):
    quantize = "nf4" if method == "qlora" else None
    num_labels = 3 if task == "classify" else None
    model = nibble.load_model(path, task=task, num_labels=num_labels, quantize=quantize, pooling=pooling)
    config = TrainConfig(method=method, lora_targets="all-linear", lora_dropout=0.1, dtype="float32", device="cpu")
    prepare_model(model, config)
    return model.to(META), config


@pytest.mark.parametrize(
    "method,pooling", [("qlora", "last"), ("lora", "mean"), ("full", "last")], ids=["qlora", "lora-mean", "full"]
)
def test_classifier_step_and_evaluation_stay_on_the_model_device(shared_checkpoint, tmp_path, method, pooling):
    path, _ = shared_checkpoint("qwen3")
    model, config = meta_model(path, method, "classify", pooling)
    config.batch_size, config.max_steps, config.log_every = 3, 1, 1
    data = ClassificationData([[5, 6, 7, 8], [9, 10], [11, 12, 13]], [0, 2, 1], LabelMap(["a", "b", "c"]))
    stream = BatchStream(data, 3, pad_id=0, seed=0)
    batch = stream.next_batch()  # batches are built on the host (and moved by the trainer)
    stream.next_batch = lambda: dict(batch)

    def loss_fn(logits, labels):
        return classification_loss(logits, labels, False)

    trainer = Trainer(
        model=model, stream=stream, config=config, out=tmp_path, total_steps=1, task=label_task(data, loss_fn)
    )
    trainer.optimizer = torch.optim.AdamW(trainer._params, foreach=False)  # fused and foreach refuse meta tensors
    watch = OffMetaTensors()
    with kernels.use_backend("torch"), watch:
        trainer.step()
        metrics = evaluate(model.eval(), data, 3, pad_id=0)
    assert not watch.found, "\n".join(watch.found)
    assert metrics["examples"] == 3


def test_instruct_step_and_generation_stay_on_the_model_device(shared_checkpoint):
    path, _ = shared_checkpoint("qwen3")
    model, _ = meta_model(path, "qlora", "causal_lm")
    labels = [[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 9], [IGNORE_INDEX, 11, 12]]
    host = collate_lm([[5, 6, 7, 8, 9], [10, 11, 12]], labels, pad_id=0)  # built on the host, then moved
    batch = {key: value.to(META) for key, value in host.items()}
    watch = OffMetaTensors()
    with kernels.use_backend("torch"), watch:
        model.train()
        lm_loss(lm_forward(model, batch)).backward()
        model.eval()
        generate(model, [5, 6, 7], max_new_tokens=2, eos_token_id=[])
    assert not watch.found, "\n".join(watch.found)


def test_the_watch_reports_a_factory_call_without_a_device():
    watch = OffMetaTensors()
    x = torch.ones(3, device=META)
    with watch:
        _ = x + torch.arange(3, device=x.device)  # a test's own calls are never reported
        assert not watch.found
        pad_sequences([[1, 2], [3]], 0)  # builds a host batch with torch.full(...): host-side by design
        assert not watch.found
        kv = KVCache(nibble.model.ModelConfig(**TINY_CONFIG), 1, 4)  # device defaults to "cpu": the bug to catch
    assert kv.keys[0].device.type == "cpu"
    assert watch.found and all("model.py" in f and "aten.empty" in f for f in watch.found), watch.found
