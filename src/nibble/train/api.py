"""``nibble.train(config)``: a training run from Python (a notebook, a script), the one code path ``nibble train``
also takes."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nibble.errors import NibbleError
from nibble.train.config import PATH_FIELDS, TrainConfig, absolute_paths, check_keys, resolve_config
from nibble.train.run import TrainResult


def train(config: TrainConfig | Mapping[str, Any] | str | Path, **overrides: Any) -> TrainResult:
    """Fine-tune as ``nibble train`` does and return what the run left behind.

    Args:
        config: a :class:`TrainConfig`, a dict of its fields, or the path of a YAML file (keys as in
            ``nibble train CONFIG.yaml``).
        overrides: fields that win over ``config``, as flags win over the YAML file
            (``train("run.yaml", max_steps=100)``).

    Returns:
        The run's paths (``output``, ``final``, ``best``, ``checkpoint``, ``metrics_file``), its final
        evaluation (``report``), its ``metrics`` records and how far it went (``step``, ``stopped_early``).

    Raises:
        NibbleError: everything ``nibble train`` reports as ``error: ...`` (a bad key, path, row or value).
    """
    from nibble.train.run import run_training

    check_keys(overrides, "train()")
    if isinstance(config, TrainConfig):
        config = dataclasses.replace(config, **_paths_as_str(overrides))
        paths = absolute_paths({key: getattr(config, key) for key in PATH_FIELDS}, os.getcwd())
        config = dataclasses.replace(config, **paths).validate()
    elif isinstance(config, Mapping):
        check_keys(config, "config")
        config = resolve_config(None, {**_paths_as_str(config), **_paths_as_str(overrides)})
    elif isinstance(config, (str, Path)):
        config = resolve_config(config, _paths_as_str(overrides))
    else:
        raise NibbleError(f"config must be a TrainConfig, a dict or a YAML path, got {type(config).__name__}")
    return run_training(config)


def _paths_as_str(values: Mapping[str, Any]) -> dict[str, Any]:
    """``model=Path(...)`` as ``model="..."``: the fields hold paths as str, as YAML and the flags give them."""
    return {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in values.items()}
