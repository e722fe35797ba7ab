"""Resumable checkpoints without pickle: tensors in safetensors, everything else in JSON.

``OUT/checkpoints/step-N/`` holds
- ``trainable.safetensors``: every trainable parameter by name;
- ``optimizer.safetensors``: the optimizer state tensors, ``{param name}.{state key}``;
- ``rng.safetensors``: torch (CPU and CUDA), numpy and python generator states as integer tensors;
- ``state.json``: step, data position, optimizer groups, scheduler, grad scaler, early stopping and
  the scalar parts of the RNG states; ``config.yaml``: the run's config.
It is written under a temporary name and renamed, so a directory named ``step-N`` is always complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nibble.errors import NibbleError
from nibble.io.safetensors import copy_into, load_file, save_file_atomic

_STEP_DIR = re.compile(r"step-(\d+)")
STATE_FILE = "state.json"


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


def set_rng_state(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    n = scalars["numpy"]
    keys = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = scalars["python"]
    random.setstate((p["version"], tuple(int(x) for x in tensors["python"].tolist()), p["gauss_next"]))


def optimizer_state(
    optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """The optimizer's state tensors keyed by parameter name, and its param groups with names for ids."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for index, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{names[index]}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = []
    for group in sd["param_groups"]:
        g = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()}
        g["params"] = [names[i] for i in group["params"]]
        groups.append(g)
    return tensors, groups


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    names: dict[int, str],
    tensors: dict[str, torch.Tensor],
    groups: list[dict[str, Any]],
    source: str,
) -> None:
    index_of = {name: i for i, name in names.items()}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, slot = key.rpartition(".")
        if name not in index_of:
            raise NibbleError(f"{source}: optimizer state for unknown parameter '{name}'; resume with the same config")
        state.setdefault(index_of[name], {})[slot] = value
    restored = []
    for group in groups:
        g = {k: (tuple(v) if k == "betas" else v) for k, v in group.items()}
        missing = [n for n in group["params"] if n not in index_of]
        if missing:
            raise NibbleError(f"{source}: optimizer group names unknown parameter '{missing[0]}'")
        g["params"] = [index_of[n] for n in group["params"]]
        restored.append(g)
    try:
        optimizer.load_state_dict({"state": state, "param_groups": restored})
    except (ValueError, KeyError) as exc:
        raise NibbleError(f"{source}: optimizer state does not fit this run ({exc}); use the same config") from None


def save_checkpoint(
    directory: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    param_names: dict[int, str],
    state: dict[str, Any],
    config_yaml: str,
) -> Path:
    """Write ``directory/step-{step}`` atomically (temp dir, then rename); returns its path."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step-{step}"
    tmp = directory / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file_atomic({k: v.detach() for k, v in trainable.items()}, tmp / "trainable.safetensors")
    opt_tensors, groups = optimizer_state(optimizer, param_names)
    save_file_atomic(opt_tensors, tmp / "optimizer.safetensors")
    rng_tensors, rng_scalars = rng_state()
    save_file_atomic(rng_tensors, tmp / "rng.safetensors")
    full_state = {**state, "step": step, "optimizer_groups": groups, "rng": rng_scalars}
    (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1), encoding="utf-8")
    (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``directory`` as ``(step, path)``, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and leftovers of interrupted writes."""
    for p in directory.glob(".tmp-step-*"):
        shutil.rmtree(p, ignore_errors=True)
    for _, path in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any], dict]:
    """``(trainable, optimizer tensors, state, rng tensors)`` of a checkpoint directory.

    Raises:
        NibbleError: a missing directory or file, or a state.json that cannot be read.
    """
    if not (path / STATE_FILE).is_file():
        raise NibbleError(f"{path}: not a checkpoint (no {STATE_FILE}); give a checkpoints/step-N directory")
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise NibbleError(f"{path / STATE_FILE}: unreadable ({exc}); resume from an older checkpoint") from None
    files = {}
    for name in ("trainable", "optimizer", "rng"):
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise NibbleError(f"{file}: missing; resume from an older checkpoint")
        files[name] = load_file(file)
    return files["trainable"], files["optimizer"], state, files["rng"]


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy checkpointed values into the model's trainable parameters (exact names and shapes required)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    copy_into(params, tensors, source, "the trainable weights do not fit this model; resume with the same config")
