"""The random number generators a run draws from: seeding them, and their state for exact resume."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The torch, numpy and python global RNG states: tensors and JSON scalars."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_next = random.getstate()
    tensors["python"] = torch.tensor(internal, dtype=torch.int64)
    scalars = {
        "numpy": {"name": name, "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "gauss_next": gauss_next},
    }
    return tensors, scalars


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any], rank: int = 0) -> None:
    """Restore the generators saved by :func:`rng_state`; rank ``rank`` of a torchrun run takes its own torch
    states where :func:`rank_rng_states` saved them (a run resumed on more ranks than it had: rank 0's)."""
    torch.set_rng_state(tensors.get(f"torch.rank{rank}", tensors["torch"]))
    cuda_keys = (k for k in tensors if k.startswith("cuda.") and k[5:].isdigit())
    cuda = [tensors[k] for k in sorted(cuda_keys, key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
        if f"cuda.rank{rank}" in tensors:
            torch.cuda.set_rng_state(tensors[f"cuda.rank{rank}"])
    n = scalars["numpy"]
    keys = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = scalars["python"]
    random.setstate((p["version"], tuple(int(x) for x in tensors["python"].tolist()), p["gauss_next"]))


def rank_rng_states() -> dict[str, torch.Tensor]:
    """Under torchrun, the torch generator states of every rank but 0 (``torch.rank{r}``, and ``cuda.rank{r}``
    for each rank's own GPU), gathered on every rank (a collective: all ranks call it); empty otherwise."""
    from nibble.train.distributed import current, gather_parts

    part = current()
    if not part.active:
        return {}
    states = {"torch": gather_parts(torch.get_rng_state()[None])}
    if torch.cuda.is_available():
        states["cuda"] = gather_parts(torch.cuda.get_rng_state()[None])
    return {f"{kind}.rank{r}": parts[r][0].cpu() for kind, parts in states.items() for r in range(1, part.world)}
