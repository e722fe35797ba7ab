"""The random number generators a run draws from: seeding them, and their state for exact resume."""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from nibble.errors import NibbleError

_MT_WORDS = 624  # the Mersenne Twister's state: 624 32-bit words and a position in them
_RANK_KEY = re.compile(r"(torch|cuda)\.rank[1-9]\d*")
_CUDA_KEY = re.compile(r"cuda\.\d+")


@contextmanager
def deterministic(on: bool) -> Iterator[None]:
    """Inside, with ``on`` (``--deterministic``): ``torch.use_deterministic_algorithms(True)``, a fixed cuBLAS
    workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless set: read when cuBLAS starts, so before the run's first
    matmul), and the fused 4-bit kernels on one config each with no split reduction (see
    :func:`nibble.kernels.triton_common.pinned`), so a run on a GPU repeats bit for bit. An op torch has no
    deterministic form of warns, naming itself, rather than stopping the run. Undone on the way out."""
    if not on:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace or ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        if workspace is None:
            del os.environ["CUBLAS_WORKSPACE_CONFIG"]


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


def check_rng_state(tensors: dict[str, torch.Tensor], scalars: Any, source: str) -> None:
    """Check saved generator states against the ones this process builds before any generator sees them: the
    known names only, each of the same shape and dtype, the Mersenne Twister words and positions in range
    (numpy's position is not bounds-checked by numpy itself: a wrong one crashes the process).

    Raises:
        NibbleError: the first state that does not fit, naming it.
    """
    built, _ = rng_state()
    where = f"{source}/rng.safetensors"
    for key, value in tensors.items():
        if _RANK_KEY.fullmatch(key):
            like = built["torch"] if key.startswith("torch") else built.get("cuda.0")
        elif _CUDA_KEY.fullmatch(key):
            like = built.get(key, built.get("cuda.0"))
        else:
            like = built.get(key)
        if like is None and not key.startswith("cuda"):
            raise NibbleError(f"{where}: unexpected generator state '{key}'; the checkpoint is damaged")
        like = like if like is not None else torch.zeros(16, dtype=torch.uint8)  # (no CUDA here: never used)
        if value.shape != like.shape or value.dtype != like.dtype:
            raise NibbleError(
                f"{where}: '{key}' is {value.dtype}{list(value.shape)}, a generator state here is "
                f"{like.dtype}{list(like.shape)}; the checkpoint is damaged"
            )
    for key in ("torch", "numpy", "python"):
        if key not in tensors:
            raise NibbleError(f"{where}: missing generator state '{key}'; the checkpoint is damaged")
    words = (tensors["numpy"], tensors["python"][:-1])
    if any(bool(((w < 0) | (w >= 2**32)).any()) for w in words) or not 0 <= int(tensors["python"][-1]) <= _MT_WORDS:
        raise NibbleError(f"{where}: a Mersenne Twister state is out of range; the checkpoint is damaged")
    n = scalars.get("numpy") if isinstance(scalars, dict) else None
    p = scalars.get("python") if isinstance(scalars, dict) else None
    numpy_ok = isinstance(n, dict) and n.get("name") == "MT19937" and n.get("has_gauss") in (0, 1)
    numpy_ok = numpy_ok and type(n.get("pos")) is int and 0 <= n["pos"] <= _MT_WORDS
    numpy_ok = numpy_ok and isinstance(n.get("cached_gaussian"), float) and math.isfinite(n["cached_gaussian"])
    gauss = p.get("gauss_next") if isinstance(p, dict) else None
    python_ok = isinstance(p, dict) and p.get("version") == random.getstate()[0]
    python_ok = python_ok and (gauss is None or (isinstance(gauss, float) and math.isfinite(gauss)))
    if not (numpy_ok and python_ok):
        raise NibbleError(
            f"{source}/state.json: 'rng' is not a generator state this process can take; the checkpoint is damaged"
        )


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
