"""Schedule values, optimizer groups, and the pickle-free checkpoint pieces (optimizer state, RNG, pruning)."""

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from nibble.errors import NibbleError
from nibble.train.checkpoint import (
    list_checkpoints,
    load_checkpoint,
    load_optimizer_state,
    load_trainable,
    prune_checkpoints,
    save_checkpoint,
)
from nibble.train.optim import WarmupCosine, build_optimizer
from nibble.train.rng import rng_state, set_rng_state


def test_warmup_then_cosine_to_the_floor():
    s = WarmupCosine(total_steps=10, warmup_ratio=0.2, min_ratio=0.1)
    assert s.warmup_steps == 2
    assert [s.factor(0), s.factor(1)] == [0.5, 1.0]
    for step in range(2, 10):
        progress = (step - 2) / 8
        assert s.factor(step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert WarmupCosine(5).factor(0) == 1.0


def test_matrices_decay_vectors_do_not():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    opt = build_optimizer(model.named_parameters(), 1e-3, weight_decay=0.1)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [torch.Size([3, 4])]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3
    assert decay["betas"] == (0.9, 0.999)


def stepped(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        model(torch.randn(5, 4, generator=gen)).square().sum().backward()
        opt.step()
        opt.zero_grad()


def test_optimizer_state_round_trip_continues_exactly(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = build_optimizer(model.named_parameters(), 1e-2)
    names = {i: n for i, n in enumerate(n for n, p in model.named_parameters() if p.dim() >= 2)}
    names.update({len(names) + i: n for i, n in enumerate(n for n, p in model.named_parameters() if p.dim() < 2)})
    stepped(model, opt, 3, seed=1)
    trainable = dict(model.named_parameters())
    path = save_checkpoint(tmp_path, 3, trainable, opt, names, {"progress": {}}, "lr: 0.01\n")
    expected = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    expected.load_state_dict(model.state_dict())
    stepped(model, opt, 2, seed=2)

    weights, opt_tensors, state, _ = load_checkpoint(path)
    load_trainable(expected, weights, str(path))
    opt2 = build_optimizer(expected.named_parameters(), 1e-2)
    load_optimizer_state(opt2, names, opt_tensors, state["optimizer_groups"], str(path))
    stepped(expected, opt2, 2, seed=2)
    for (name, a), b in zip(model.named_parameters(), expected.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert (path / "config.yaml").read_text() == "lr: 0.01\n"


def test_rng_states_round_trip():
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.rand(3), np.random.rand(3), random.random(), np.random.randn()  # leaves a cached gaussian
    tensors, scalars = rng_state()
    assert tensors["torch"].dtype == torch.uint8
    expected = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn(), random.gauss(0, 1))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(tensors, scalars)
    got = (torch.rand(4), np.random.rand(4), random.random(), np.random.randn(), random.gauss(0, 1))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


def test_pruning_keeps_the_newest_and_ignores_partial_writes(tmp_path):
    model = nn.Linear(2, 2)
    opt = build_optimizer(model.named_parameters(), 1e-3)
    names = {0: "weight", 1: "bias"}
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, dict(model.named_parameters()), opt, names, {}, "")
    (tmp_path / ".tmp-step-5-123").mkdir()  # a write killed half-way
    (tmp_path / "step-6").mkdir()  # no state.json: not a checkpoint
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 2, 3, 4]
    prune_checkpoints(tmp_path, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
    assert not (tmp_path / ".tmp-step-5-123").exists()


def test_mismatched_checkpoints_are_user_errors(tmp_path):
    model = nn.Linear(2, 2)
    opt = build_optimizer(model.named_parameters(), 1e-3)
    path = save_checkpoint(tmp_path, 1, dict(model.named_parameters()), opt, {0: "weight", 1: "bias"}, {}, "")
    weights, *_ = load_checkpoint(path)
    with pytest.raises(NibbleError, match="do not fit this model"):
        load_trainable(nn.Linear(2, 3, bias=False), weights, str(path))
    with pytest.raises(NibbleError, match="has shape"):
        load_trainable(nn.Linear(3, 2), weights, str(path))
    (path / "rng.safetensors").unlink()
    with pytest.raises(NibbleError, match="rng.safetensors: missing"):
        load_checkpoint(path)
    with pytest.raises(NibbleError, match="not a checkpoint"):
        load_checkpoint(tmp_path)
