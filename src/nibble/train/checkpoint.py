"""Resumable checkpoints without pickle: tensors in safetensors, everything else in JSON.

``OUT/checkpoints/step-N/`` holds
- ``trainable.safetensors``: every trainable parameter by name;
- ``optimizer.safetensors``: the optimizer state tensors, ``{param name}.{state key}``;
- ``rng.safetensors``: torch (CPU and CUDA), numpy and python generator states as integer tensors;
- ``rollouts.safetensors`` (only between the steps that reuse one drawn batch, GRPO's ``num_iterations``): what the
  task's rollout made of the batch (completions, old log-probs, advantages), ``{rank}.{micro-batch}.{name}``;
- ``state.json``: step, data position, optimizer groups, scheduler, grad scaler, early stopping and
  the scalar parts of the RNG states; ``config.yaml``: the run's config;
- ``manifest.json``: the size and SHA-256 of every other file, written last.
It is written under a temporary name and renamed, so a directory named ``step-N`` is always complete; the
manifest catches what happens to it afterwards (a bad disk, a copy cut short, a hand edit): resuming
verifies it and falls back to the newest checkpoint that is intact.

Under torchrun, rank 0 writes it and every rank's generator states join ``rng.safetensors``. With FSDP2
(sharded parameters) the weights and optimizer tensors go instead to ``shards/``, one safetensors file per rank
written by ``torch.distributed.checkpoint``, which also reads them back on any number of ranks (the manifest
lists them as ``shards/NAME``); the directory is renamed only after every rank finished its part.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nibble.errors import NibbleError, first_line
from nibble.io.files import read_json_object, remove_stale_staging, sha256_file, staged_dir, write_json
from nibble.io.safetensors import check_fit, copy_into, load_file, save_file_atomic
from nibble.train.distributed import barrier, broadcast_text, current, is_sharded
from nibble.train.rng import rng_state

_STEP_DIR = re.compile(r"step-(\d+)")
STATE_FILE = "state.json"
MANIFEST = "manifest.json"
SHARDS = "shards"
ROLLOUTS = "rollouts.safetensors"


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
    """Give ``optimizer`` the checkpointed state once it is proven to fit (see :func:`check_optimizer_state`).

    Raises:
        NibbleError: the state does not fit this run's optimizer; names the tensor or the group key.
    """
    check_optimizer_state(optimizer, names, tensors, groups, source)
    index_of = {name: i for i, name in names.items()}
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, slot = key.rpartition(".")
        state.setdefault(index_of[name], {})[slot] = value
    restored = []
    for group in groups:
        g = {k: (tuple(v) if k == "betas" else v) for k, v in group.items()}
        g["params"] = [index_of[n] for n in group["params"]]
        restored.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": restored})


def check_optimizer_state(
    optimizer: torch.optim.Optimizer,
    names: dict[int, str],
    tensors: dict[str, torch.Tensor],
    groups: Any,
    source: str,
) -> None:
    """Check a checkpoint's optimizer state against the state this run's optimizer builds (created first when
    it has none): the same tensor names, shapes and dtypes (a parameter may have no state at all, as torch
    leaves one that never had a gradient), finite values, second moments and step counts not negative; and
    the same groups over the same parameters, each setting of the same kind, finite and in range.

    Raises:
        NibbleError: the first tensor or group key that does not fit, naming it.
    """
    if not optimizer.state:
        _create_state(optimizer)
    built, built_groups = optimizer_state(optimizer, names)
    stored = {key.rpartition(".")[0] for key in tensors}
    expected = {key: value for key, value in built.items() if key.rpartition(".")[0] in stored}
    check_fit(expected, tensors, f"{source}/optimizer.safetensors", "resume with the same config", same_dtype=True)
    for key, value in tensors.items():
        if key.rpartition(".")[2] in ("exp_avg_sq", "max_exp_avg_sq", "step") and bool((value < 0).any()):
            raise NibbleError(f"{source}/optimizer.safetensors: '{key}' is negative; the checkpoint is damaged")
    where = f"{source}/{STATE_FILE}: optimizer_groups"
    if not isinstance(groups, list) or len(groups) != len(built_groups):
        raise NibbleError(f"{where} must be a list of {len(built_groups)} groups; resume with the same config")
    for i, (group, mine) in enumerate(zip(groups, built_groups, strict=True)):
        if not isinstance(group, dict) or set(group) != set(mine):
            raise NibbleError(f"{where}[{i}] must hold exactly {sorted(mine)}; resume with the same config")
        if group["params"] != mine["params"]:
            raise NibbleError(f"{where}[{i}] lists other parameters than this run trains; resume with the same config")
        for key, value in group.items():
            if key != "params" and not _same_kind(value, mine[key]):
                raise NibbleError(f"{where}[{i}] '{key}' is {value!r}; the checkpoint is damaged")


def _same_kind(value: Any, built: Any) -> bool:
    """Whether an optimizer group setting read from JSON is of the kind the run's own is, finite and in range
    (numbers are not negative; betas are below 1)."""
    if isinstance(built, bool) or built is None:
        return value is None or isinstance(value, bool)
    if isinstance(built, int | float):
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and math.isfinite(value) and value >= 0
    if isinstance(built, list):
        items = isinstance(value, list) and len(value) == len(built)
        return items and all(_same_kind(v, b) and v < 1 for v, b in zip(value, built, strict=True))
    return type(value) is type(built)


def save_checkpoint(
    directory: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    param_names: dict[int, str],
    state: dict[str, Any],
    config_yaml: str,
    rank_rng: dict[str, torch.Tensor] | None = None,
    rollouts: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``directory/step-{step}`` atomically (a staged directory, renamed when complete); returns its path.
    ``rank_rng`` (see :func:`nibble.train.rng.rank_rng_states`) joins this process's generators in rng.safetensors;
    ``rollouts`` (every rank's, gathered) go to rollouts.safetensors.
    Under torchrun every rank calls it; rank 0 writes, and with sharded (FSDP2) weights each rank its shard."""
    final = directory / f"step-{step}"
    main = current().is_main
    sharded = is_sharded(list(trainable.values()))
    opt_tensors, groups = optimizer_state(optimizer, param_names)
    rng_tensors, rng_scalars = rng_state()
    tensors = [*trainable.values(), *opt_tensors.values(), *rng_tensors.values()]
    needed = sum(t.numel() * t.element_size() for t in tensors)  # (sharded: every rank's part together)
    with staged_dir(final, overwrite=True, needed=needed) if main else nullcontext() as staging:
        if sharded:
            import torch.distributed.checkpoint as dcp

            tmp = Path(broadcast_text(str(staging)))
            tensors = {**_prefixed("trainable.", trainable), **_prefixed("optimizer.", opt_tensors)}
            dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp / SHARDS), save_distributed=True))
            barrier()  # every rank's shard is on disk
        if not main:
            return final
        tmp = staging
        if not sharded:
            save_file_atomic({k: v.detach() for k, v in trainable.items()}, tmp / "trainable.safetensors")
            save_file_atomic(opt_tensors, tmp / "optimizer.safetensors")
        save_file_atomic({**rng_tensors, **(rank_rng or {})}, tmp / "rng.safetensors")
        if rollouts:
            save_file_atomic(rollouts, tmp / ROLLOUTS)
        full_state = {**state, "step": step, "optimizer_groups": groups, "rng": rng_scalars}
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1), encoding="utf-8")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        write_manifest(tmp)
    return final


def _prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {prefix + name: value.detach() for name, value in tensors.items()}


def load_sharded(
    path: Path, trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, names: dict[int, str]
) -> dict[str, torch.Tensor]:
    """Read ``path/shards`` into ``trainable`` (sharded or whole tensors, in place) and into the optimizer's state
    tensors, created first by a step that changes nothing; returns those state tensors by name (for
    :func:`load_optimizer_state`). Every rank calls it, on any number of ranks.

    Raises:
        NibbleError: the shards do not hold what this run trains.
    """
    import torch.distributed.checkpoint as dcp

    _create_state(optimizer)
    opt_tensors, _ = optimizer_state(optimizer, names)
    targets = {**_prefixed("trainable.", trainable), **_prefixed("optimizer.", opt_tensors)}
    try:
        dcp.load(targets, storage_reader=dcp.HuggingFaceStorageReader(str(path / SHARDS)))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise NibbleError(
            f"{path / SHARDS}: does not fit this run ({first_line(exc)}); resume with the same config"
        ) from None
    return opt_tensors


def _create_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter its optimizer state (AdamW creates it lazily): one step with zero gradients at lr 0,
    which moves no weight; the state it creates is overwritten by the checkpoint's."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


def write_manifest(directory: Path) -> None:
    """Record the size and SHA-256 of every file in ``directory`` (and its ``shards/``) in its ``manifest.json``."""
    files = {
        p.relative_to(directory).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    write_json(directory / MANIFEST, {"files": files})


def _plain_name(name: str) -> bool:
    """A file of the checkpoint itself, or of its ``shards/``: nothing hidden, nothing outside it."""
    parts = name.split("/")
    return len(parts) in (1, 2) and (len(parts) == 1 or parts[0] == SHARDS) and not parts[-1].startswith(".")


def verify_checkpoint(path: Path) -> None:
    """Check every file of a checkpoint against its manifest (sizes first, then SHA-256).

    Raises:
        NibbleError: no or a garbled manifest, or a file that is missing, of another size or another
            SHA-256; names the file.
    """
    if not (path / MANIFEST).is_file():
        raise NibbleError(f"{path / MANIFEST}: missing; the checkpoint is incomplete or damaged")
    manifest = read_json_object(path / MANIFEST, "the checkpoint is damaged; resume from another one")
    files = manifest.get("files")
    entries_ok = isinstance(files, dict) and STATE_FILE in files
    if entries_ok:
        entries_ok = all(
            isinstance(e, dict) and type(e.get("size")) is int and isinstance(e.get("sha256"), str)
            for e in files.values()
        )
    if not entries_ok or not all(isinstance(name, str) and _plain_name(name) for name in files):
        raise NibbleError(f"{path / MANIFEST}: garbled manifest; the checkpoint is damaged")
    for name, entry in files.items():
        file = path / name
        if not file.is_file():
            raise NibbleError(f"{file}: missing from the checkpoint; resume from another one")
        if file.stat().st_size != entry["size"]:
            raise NibbleError(
                f"{file}: {file.stat().st_size} bytes, the manifest says {entry['size']}; the checkpoint is damaged"
            )
    for name, entry in files.items():
        if sha256_file(path / name) != entry["sha256"]:
            raise NibbleError(f"{path / name}: SHA-256 differs from the manifest; the checkpoint is damaged")


def newest_intact_checkpoint(directory: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint under ``directory`` that passes :func:`verify_checkpoint`, and the newer ones
    skipped with the reason for each."""
    skipped = []
    for _, path in reversed(list_checkpoints(directory)):
        try:
            verify_checkpoint(path)
        except NibbleError as exc:
            skipped.append((path, str(exc)))
            continue
        return path, skipped
    return None, skipped


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
    remove_stale_staging(directory)
    for _, path in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    """The state.json object of the checkpoint directory ``path``.

    Raises:
        NibbleError: ``path`` is no checkpoint, or its state.json cannot be read.
    """
    if not (path / STATE_FILE).is_file():
        raise NibbleError(f"{path}: not a checkpoint (no {STATE_FILE}); give a checkpoints/step-N directory")
    return read_json_object(path / STATE_FILE, "resume from an older checkpoint")


def discard_checkpoints_after(directory: Path, step: int) -> None:
    """Delete the checkpoints of steps after ``step``: a run resumed from ``step`` writes them again, and a
    damaged one left in place would count as the newest when checkpoints are pruned."""
    for found, path in list_checkpoints(directory):
        if found > step:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any], dict]:
    """``(trainable, optimizer tensors, state, rng tensors)`` of a checkpoint directory (the first two empty for a
    sharded one: see :func:`load_sharded`).

    Raises:
        NibbleError: a missing directory or file, a file that does not match the manifest, or a state.json
            that cannot be read.
    """
    if not (path / STATE_FILE).is_file():
        raise NibbleError(f"{path}: not a checkpoint (no {STATE_FILE}); give a checkpoints/step-N directory")
    verify_checkpoint(path)
    state = read_state(path)
    files = {}
    sharded = (path / SHARDS).is_dir()
    for name in ("rng",) if sharded else ("trainable", "optimizer", "rng"):
        file = path / f"{name}.safetensors"
        if not file.is_file():
            raise NibbleError(f"{file}: missing; resume from an older checkpoint")
        files[name] = load_file(file)
    return files.get("trainable", {}), files.get("optimizer", {}), state, files["rng"]


def load_rollouts(path: Path) -> dict[str, torch.Tensor]:
    """The rollouts a checkpoint taken between two steps on one drawn batch saved (see :func:`save_checkpoint`);
    empty when it holds none. (The manifest was verified by :func:`load_checkpoint`.)"""
    return load_file(path / ROLLOUTS) if (path / ROLLOUTS).is_file() else {}


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy checkpointed values into the model's trainable parameters (exact names and shapes required)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fix = "the trainable weights do not fit this model; resume with the same config"
    copy_into(params, tensors, source, fix, same_dtype=True)
