"""The 4-bit base on disk: a model's block projections quantized once per source and format, then reused.

Quantizing every projection of a model takes most of a 4-bit load (seconds to minutes on a CPU), and eval,
predict, generate and merge would each pay it again. :func:`load_model` therefore keeps the quantized
projections in ``<cache>/quantized/<model dir name>-<key>.safetensors`` (``<cache>`` is
:func:`nibble.io.fetch.cache_dir`, where GGUF conversions also go). The key hashes the model directory's
absolute path and the :class:`QuantSpec`; the file's metadata records each source file's path, size,
modification time, inode and status-change time, so a changed source (even one of the same size and mtime) is
quantized again and its entry replaced; an entry that cannot be read, whose tensors are not exactly what its
weights write (names, dtypes, shapes, finite scales), or that does not fit the model (a projection's shape,
the count of projections: see :meth:`QuantCache.refresh`) is made again, saying so in one line. Entries are
written to a temporary name and renamed (a crash never leaves a partial one), and the tensors are the quantizer's own
bytes: a load from the cache gives bit-identical weights.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

from nibble.errors import NibbleError
from nibble.io.fetch import cache_dir
from nibble.io.files import WriteError, file_identity, name_part
from nibble.io.safetensors import Checkpoint, SafetensorsFile, save_file_atomic
from nibble.quant import INT4Weight, NF4Weight, QuantizedWeight, QuantSpec

_META_KEY = "nibble.quantized"
_KEYS = "nibble.weights"
_VERSION = 2  # bump when quantization or the stored layout changes: older entries are then made again


def _sources(ckpt: Checkpoint) -> list[list]:
    """The identity (see :func:`nibble.io.files.file_identity`) of each file the checkpoint's tensors come from."""
    return [file_identity(f.path) for f in ckpt.files]


class QuantCache:
    """The cache entry of one model directory in one 4-bit format."""

    def __init__(self, model_dir: Path, ckpt: Checkpoint, spec: QuantSpec):
        self.spec = spec
        key = json.dumps([str(model_dir.resolve()), spec.to_json(), _VERSION])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        name = f"{name_part(model_dir.resolve().name)}-{spec.name}-{digest}.safetensors"
        self.path = cache_dir() / "quantized" / name
        self.stamp = json.dumps({"version": _VERSION, "spec": spec.to_json(), "sources": _sources(ckpt)})

    def load(self, dtype: torch.dtype) -> dict[str, QuantizedWeight]:
        """The cached weights by state-dict key (``model.layers.0.self_attn.q_proj.weight``) with compute dtype
        ``dtype``; empty when there is no entry for these sources (or an unreadable one, which is made again)."""
        if not self.path.is_file():
            return {}
        try:
            stored = SafetensorsFile(self.path)
            metadata = stored.metadata or {}
            if metadata.get(_META_KEY) != self.stamp:
                return {}
            tensors = {name: stored.read(name) for name in stored.tensors}
            keys = json.loads(metadata[_KEYS])
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or len(set(keys)) < len(keys):
                raise NibbleError(f"'{_KEYS}' is not a list of distinct names")
            weights = {key: _weight(tensors, key, self.spec, dtype) for key in keys}
            if set(tensors) != set().union(*(w.state_dict(k) for k, w in weights.items())):
                raise NibbleError("it holds tensors no weight uses")
            return weights
        except (NibbleError, KeyError, ValueError, OSError) as exc:
            print(f"note: {self.path} is damaged ({exc}); quantizing again", file=sys.stderr, flush=True)
            return {}

    def refresh(self, loaded: set[str], weights: dict[str, QuantizedWeight], misfit: str | None) -> None:
        """After a load: write the entry when nothing came from it (``loaded`` empty), or when what came from it
        does not fit the model (``misfit``: a projection of another shape; or other projections than ``weights``,
        the ones the model holds), saying so; else leave it."""
        if loaded and misfit is None and loaded != set(weights):
            misfit = f"it holds {len(loaded)} 4-bit weights, the model {len(weights)}"
        if loaded and misfit is None:
            return
        if misfit is not None:
            print(f"note: {self.path} does not fit this model ({misfit}); quantized again", file=sys.stderr)
        self.store(weights.items())

    def store(self, weights: Iterable[tuple[str, QuantizedWeight]]) -> None:
        """Write the entry (atomically); a cache that cannot be written is reported on stderr and skipped."""
        tensors: dict[str, torch.Tensor] = {}
        keys = []
        for key, weight in weights:
            tensors.update(weight.state_dict(key))
            keys.append(key)
        try:
            save_file_atomic(tensors, self.path, metadata={_META_KEY: self.stamp, _KEYS: json.dumps(keys)})
        except WriteError as exc:  # (a cache: the run goes on without it)
            print(f"note: cannot keep the 4-bit weights in the cache: {exc}", file=sys.stderr, flush=True)


def _weight(tensors: dict[str, torch.Tensor], key: str, spec: QuantSpec, dtype: torch.dtype) -> QuantizedWeight:
    """The weight ``key`` of the entry's ``tensors``, which must be exactly what it writes (the constructors
    convert some dtypes and views silently) with finite floats; compute dtype ``dtype``."""
    if spec.format == "int4":
        weight: QuantizedWeight = INT4Weight.from_state_dict(tensors, key, "entry", dtype=dtype)
    else:
        weight = NF4Weight.from_state_dict(tensors, key, "entry")
    for name, canonical in weight.state_dict(key).items():  # (before the dtype changes NF4's quant state)
        held = tensors[name]
        if (held.dtype, held.shape) != (canonical.dtype, canonical.shape):
            want = f"{canonical.dtype} {list(canonical.shape)}"
            raise NibbleError(f"tensor '{name}' is {held.dtype} {list(held.shape)}, not {want}")
        if held.is_floating_point() and not bool(torch.isfinite(held).all()):
            raise NibbleError(f"tensor '{name}' holds NaN or infinite values")
    weight.dtype = dtype
    return weight
