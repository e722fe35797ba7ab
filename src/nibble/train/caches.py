"""What nibble keeps on disk between commands (``nibble cache``): each kind of entry, where it lives, what it weighs,
and clearing it. Every entry is made again when needed, so clearing one only costs time:

- ``converted``: a .gguf file converted into a Hugging Face directory (``<cache>/converted``, see
  :func:`nibble.model.loading.resolve_model_dir`), the weights ``generate``, ``train`` and the others load from;
- ``quantized``: a model's block projections in 4 bits (``<cache>/quantized``, see :mod:`nibble.model.quant_cache`);
- ``tokens``: a data file tokenized (``$NIBBLE_TOKEN_CACHE``, default ``<cache>/tokens``, see
  :mod:`nibble.data.tokens`);
- ``downloads``: files ``nibble demo`` fetched (the SmolLM2 GGUF file, in ``<cache>``).

``<cache>`` is ``$NIBBLE_CACHE``, else ``~/.cache/nibble``. Only entries of these kinds are listed or removed:
anything else in those directories is left alone, and so is what a live process is writing.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from nibble.data.tokens import token_cache_root
from nibble.errors import NibbleError
from nibble.io.fetch import SMOLLM2, cache_dir
from nibble.io.files import remove_dead_temporaries, tree_bytes
from nibble.io.gguf.model import SOURCE_NAME

KINDS = ("converted", "quantized", "tokens", "downloads")


@dataclass(frozen=True)
class CacheEntry:
    """One entry: its ``kind`` (one of :data:`KINDS`), its file or directory, and its size in bytes."""

    kind: str
    path: Path
    size: int


def cache_location(kind: str) -> Path:
    """The directory entries of ``kind`` live in."""
    root = cache_dir()
    return {"converted": root / "converted", "quantized": root / "quantized", "tokens": token_cache_root()}.get(
        kind, root
    )


def _is_entry(kind: str, path: Path) -> bool:
    if path.name.startswith("."):  # a temporary name: being written, or left by a killed writer
        return False
    if kind == "converted":
        return (path / SOURCE_NAME).is_file()
    if kind == "quantized":
        return path.is_file() and path.suffix == ".safetensors"
    if kind == "tokens":
        return (path / "meta.json").is_file()
    return path.name == SMOLLM2.filename and path.is_file()


def check_kinds(kinds: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``kinds`` checked (all of :data:`KINDS` when empty).

    Raises:
        NibbleError: a name that is no kind of cache.
    """
    for kind in kinds:
        if kind not in KINDS:
            raise NibbleError(f"'{kind}' is no kind of nibble cache; use one or more of {', '.join(KINDS)}")
    return tuple(kinds) or KINDS


def cache_entries(kinds: tuple[str, ...] = KINDS) -> list[CacheEntry]:
    """Every entry of ``kinds``, by kind then name."""
    entries = []
    for kind in check_kinds(kinds):
        where = cache_location(kind)
        try:
            paths = sorted(where.iterdir())
        except OSError:  # no such directory yet (or not readable): nothing cached there
            continue
        entries += [CacheEntry(kind, p, tree_bytes(p)) for p in paths if _is_entry(kind, p)]
    return entries


def clear_caches(kinds: tuple[str, ...] = KINDS) -> list[CacheEntry]:
    """Remove every entry of ``kinds`` (and what killed writers left beside them); returns what was removed.

    Raises:
        NibbleError: an entry that cannot be removed (naming it).
    """
    removed = []
    for entry in cache_entries(kinds):
        try:
            if entry.path.is_dir() and not entry.path.is_symlink():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink()
        except FileNotFoundError:  # removed meanwhile (another clear, a rebuild)
            continue
        except OSError as exc:
            raise NibbleError(f"{entry.path}: cannot remove it ({exc.strerror}); check its permissions") from None
        removed.append(entry)
    for kind in check_kinds(kinds):
        remove_dead_temporaries(cache_location(kind))
    return removed
