"""Token sequences on disk: a data file is read and tokenized once, as a stream, into a cache directory of flat
arrays that later runs memory-map, so a dataset larger than memory trains with flat RAM.

A cache directory holds ``meta.json`` (what was cached and from what; column dtypes and lengths) and one raw
array per column: a ragged column ``name`` is ``name.bin`` (all rows' values, concatenated) plus
``name.offsets.bin`` (int64, rows + 1); a per-row column is ``name.bin``. It lives under
``$NIBBLE_TOKEN_CACHE`` (default ``<cache>/tokens``, where ``<cache>`` is ``$NIBBLE_CACHE`` or
``~/.cache/nibble``), named after the data file and a key over everything that changes the tokens: the file's
identity (resolved path, size, modification time), the tokenizer files, the ``tokenizers`` version and the
caller's settings. It is built under a temporary name and renamed when complete, so a killed build never
looks finished; building it anew for a changed file removes the caches of the file's older versions.
"""

from __future__ import annotations

import array
import atexit
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from nibble.data.records import check_data_path
from nibble.errors import NibbleError
from nibble.io.fetch import cache_dir
from nibble.io.files import file_identity, read_json_object, staged_dir

CACHE_FORMAT = 2
_NAME_CHARS = 100  # of the data file's name in the cache entry's (a name may have 255 bytes)
TOKENIZER_IDENTITY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_FLUSH_VALUES = 1 << 16  # buffered values per column before a write: bounded memory, few system calls
_GATHER_VALUES = 1 << 22  # values read at once when summing over many rows
_STALE_STAGING_S = 24 * 3600  # a build staged longer ago than this was killed


def token_cache_root() -> Path:
    """Where token caches live: ``$NIBBLE_TOKEN_CACHE``, else ``<nibble cache>/tokens``."""
    configured = os.environ.get("NIBBLE_TOKEN_CACHE")
    return Path(configured).expanduser() if configured else cache_dir() / "tokens"


class Ragged:
    """Rows of integers of varying length over one flat array: row ``r`` is ``values[offsets[r]:offsets[r + 1]]``.

    ``index`` selects and orders the visible rows (None: all, in order) and ``limit`` cuts each to its first
    ``limit`` values, both without copying ``values``, which may be a memory map. Rows come out as int64 arrays.
    """

    def __init__(
        self, values: np.ndarray, offsets: np.ndarray, index: np.ndarray | None = None, limit: int | None = None
    ):
        self.values, self.offsets, self.index, self.limit = values, offsets, index, limit

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]], dtype: Any = np.int64) -> Ragged:
        """Rows held in memory (tests, small data)."""
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        return cls(np.fromiter(chain.from_iterable(rows), dtype, int(offsets[-1])), offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1 if self.index is None else len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        row = i if self.index is None else int(self.index[i])
        start, end = int(self.offsets[row]), int(self.offsets[row + 1])
        if self.limit is not None:
            end = min(end, start + self.limit)
        return np.asarray(self.values[start:end], dtype=np.int64)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def tolist(self) -> list[list[int]]:
        return [row.tolist() for row in self]

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """``(starts, ends)`` of the visible rows in ``values`` (int64 [N] each)."""
        starts = self.offsets[:-1] if self.index is None else self.offsets[self.index]
        ends = self.offsets[1:] if self.index is None else self.offsets[self.index + 1]
        starts, ends = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        return starts, ends if self.limit is None else np.minimum(ends, starts + self.limit)

    def lengths(self) -> np.ndarray:
        starts, ends = self.bounds()
        return ends - starts

    def subset(self, indices: Sequence[int] | np.ndarray) -> Ragged:
        """The rows at ``indices`` (of the visible rows), in that order."""
        indices = np.asarray(indices, dtype=np.int64)
        return Ragged(self.values, self.offsets, indices if self.index is None else self.index[indices], self.limit)

    def cut(self, limit: int) -> Ragged:
        """Every row cut to its first ``limit`` values."""
        return Ragged(self.values, self.offsets, self.index, limit if self.limit is None else min(limit, self.limit))

    def concat(self) -> np.ndarray:
        """The visible rows' values, concatenated (int64)."""
        parts = list(_gather(self.values, *self.bounds()))
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def total(self, skip_first: bool = False) -> int:
        """The sum of every visible value (without each row's first one with ``skip_first``)."""
        starts, ends = self.bounds()
        if skip_first:
            starts = np.minimum(starts + 1, ends)
        return sum(int(block.sum(dtype=np.int64)) for block in _gather(self.values, starts, ends))


class Packed:
    """The rows of a :class:`Ragged` concatenated in order and cut into pieces of ``length`` values (the last
    piece may be shorter); piece ``c`` covers positions ``[c * length, (c + 1) * length)`` of the concatenation."""

    def __init__(self, rows: Ragged, length: int):
        self.rows, self.length = rows, length
        self.starts, ends = rows.bounds()
        self.cum = np.concatenate([[0], np.cumsum(ends - self.starts)])  # [N + 1] row start in the concatenation
        self.size = int(self.cum[-1])

    def __len__(self) -> int:
        return math.ceil(self.size / self.length)

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"piece {i} of {len(self)}")
        begin, end = i * self.length, min((i + 1) * self.length, self.size)
        first = int(np.searchsorted(self.cum, begin, side="right")) - 1
        last = int(np.searchsorted(self.cum, end, side="left"))  # rows [first, last) overlap the piece
        parts = []
        for r in range(first, last):
            lo, hi = max(begin, int(self.cum[r])), min(end, int(self.cum[r + 1]))
            offset = int(self.starts[r]) - int(self.cum[r])
            parts.append(np.asarray(self.rows.values[offset + lo : offset + hi], dtype=np.int64))
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[np.ndarray]:
        return (self[i] for i in range(len(self)))

    def tolist(self) -> list[list[int]]:
        return [piece.tolist() for piece in self]

    def first_rows(self) -> np.ndarray:
        """The row (of ``rows``) each piece starts in."""
        return np.searchsorted(self.cum, np.arange(0, self.size, self.length), side="right") - 1

    def lengths(self) -> np.ndarray:
        starts = np.arange(0, self.size, self.length)
        return np.minimum(starts + self.length, self.size) - starts

    def total(self, skip_first: bool = False) -> int:
        """The sum of every value (without each piece's first one with ``skip_first``)."""
        total = self.rows.total()
        if skip_first and self.size:
            rows = self.first_rows()
            positions = self.starts[rows] + np.arange(0, self.size, self.length) - self.cum[rows]
            total -= int(np.asarray(self.rows.values[positions], dtype=np.int64).sum())
        return total


def _gather(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> Iterator[np.ndarray]:
    """``values[starts[k]:ends[k]]`` of every row k, concatenated, in blocks of about ``_GATHER_VALUES`` values."""
    lengths = ends - starts
    cum = np.concatenate([[0], np.cumsum(lengths)])
    row = 0
    while row < len(lengths):
        stop = max(row + 1, int(np.searchsorted(cum, cum[row] + _GATHER_VALUES, side="right")) - 1)
        positions = np.repeat(starts[row:stop] - cum[row:stop], lengths[row:stop]) + np.arange(cum[row], cum[stop])
        yield np.asarray(values[positions])
        row = stop


@dataclass(frozen=True)
class Column:
    """A column of a cache: its dtype, and whether each row holds several values (ragged) or one."""

    dtype: str
    ragged: bool = True


_TYPECODES = {
    "uint8": "B",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "float32": "f",
}  # numpy dtype -> array.array typecode


class CacheWriter:
    """Appends rows to the columns of a cache directory being built (see :func:`cached_tokens`).

    Values wait in compact ``array.array`` buffers (at most ``_FLUSH_VALUES`` per column) and are appended to
    the column files, so memory stays flat however many rows are written.
    """

    def __init__(self, directory: Path, columns: dict[str, Column]):
        self.directory, self.columns, self.rows = directory, columns, 0
        self._files = {name: open(directory / f"{name}.bin", "wb") for name in columns}
        self._values = {name: array.array(_TYPECODES[c.dtype]) for name, c in columns.items()}
        self._written = dict.fromkeys(columns, 0)
        ragged = [name for name, c in columns.items() if c.ragged]
        self._offset_files = {name: open(directory / f"{name}.offsets.bin", "wb") for name in ragged}
        self._offsets = {name: array.array("q", [0]) for name in ragged}

    def append(self, **row: Sequence[int] | int) -> None:
        """One row: a sequence for each ragged column, a number for each per-row column."""
        for name, column in self.columns.items():
            values = self._values[name]
            if column.ragged:
                values.extend(row[name])  # type: ignore[arg-type]
                self._offsets[name].append(self._written[name] + len(values))
            else:
                values.append(row[name])  # type: ignore[arg-type]
            if len(values) >= _FLUSH_VALUES or len(self._offsets.get(name, ())) >= _FLUSH_VALUES:
                self._flush(name)
        self.rows += 1

    def _flush(self, name: str) -> None:
        values = self._values[name]
        values.tofile(self._files[name])
        self._written[name] += len(values)
        self._values[name] = array.array(values.typecode)
        if name in self._offsets:
            self._offsets[name].tofile(self._offset_files[name])
            self._offsets[name] = array.array("q")

    def finish(self, meta: dict[str, Any]) -> None:
        """Write what is buffered and ``meta.json`` (with the row count and the column layout)."""
        for name in self.columns:
            self._flush(name)
        for f in chain(self._files.values(), self._offset_files.values()):
            f.close()
        layout = {
            name: {"dtype": c.dtype, "ragged": c.ragged, "values": self._written[name]}
            for name, c in self.columns.items()
        }
        (self.directory / "meta.json").write_text(
            json.dumps({**meta, "rows": self.rows, "columns": layout}, ensure_ascii=False), encoding="utf-8"
        )


class TokenCache:
    """An opened cache directory: its ``meta`` and its columns as memory maps."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.meta = read_json_object(directory / "meta.json", "delete the directory; it is rebuilt on the next run")
        self.rows: int = self.meta["rows"]

    def damage(self, columns: dict[str, Column]) -> str | None:
        """What is wrong with the cache, cheaply (None: nothing): the columns asked for with their dtypes, every
        file of the size its counts give, and each ragged column's offsets from 0, monotone, ending at its count."""
        layout, rows = self.meta.get("columns"), self.rows
        if type(rows) is not int or rows < 0 or not isinstance(layout, dict) or set(layout) != set(columns):
            return "meta.json does not describe these columns"
        for name, column in columns.items():
            entry = layout[name]
            kind = (entry.get("dtype"), entry.get("ragged")) if isinstance(entry, dict) else None
            if kind != (column.dtype, column.ragged):
                return f"column '{name}' is not {column.dtype}"
            values = entry.get("values")
            if type(values) is not int or values < 0 or (not column.ragged and values != rows):
                return f"column '{name}' has a bad count"
            files = {f"{name}.bin": values * np.dtype(column.dtype).itemsize}
            if column.ragged:
                files[f"{name}.offsets.bin"] = (rows + 1) * 8
            for file, size in files.items():
                path = self.directory / file
                if not path.is_file() or path.stat().st_size != size:
                    return f"{file} is not {size} bytes"
            if column.ragged:
                offsets = self._array(f"{name}.offsets.bin", "int64", rows + 1)
                if offsets[0] != 0 or offsets[-1] != values or bool((np.diff(offsets) < 0).any()):
                    return f"{name}.offsets.bin is not monotone from 0 to {values}"
        return None

    def _array(self, file: str, dtype: str, count: int) -> np.ndarray:
        if count == 0:  # an empty file cannot be memory-mapped
            return np.zeros(0, dtype=dtype)
        return np.memmap(self.directory / file, dtype=dtype, mode="r", shape=(count,))

    def column(self, name: str) -> np.ndarray:
        """A per-row column: [rows]."""
        layout = self.meta["columns"][name]
        return self._array(f"{name}.bin", layout["dtype"], layout["values"])

    def ragged(self, name: str) -> Ragged:
        """A ragged column."""
        layout = self.meta["columns"][name]
        values = self._array(f"{name}.bin", layout["dtype"], layout["values"])
        return Ragged(values, self._array(f"{name}.offsets.bin", "int64", self.rows + 1))


def source_identity(path: Path) -> dict[str, Any]:
    """What identifies a data file's contents cheaply: its :func:`nibble.io.files.file_identity` (of every file
    under it, for a directory)."""
    path = path.resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {"path": str(path), "files": [[str(p.relative_to(path)), *file_identity(p)[1:]] for p in files]}
    return {"path": str(path), "file": file_identity(path)[1:]}


def tokenizer_identity(tokenizer_dir: Path) -> str:
    """A hash of the files that decide how text becomes ids, and of the ``tokenizers`` version running them."""
    import tokenizers

    digest = hashlib.sha256(tokenizers.__version__.encode())
    for name in TOKENIZER_IDENTITY_FILES:
        file = tokenizer_dir / name
        digest.update(name.encode() + b"\0" + (file.read_bytes() if file.is_file() else b"") + b"\0")
    return digest.hexdigest()


def cached_tokens(
    source: str | Path,
    tokenizer_dir: Path,
    settings: dict[str, Any],
    columns: dict[str, Column],
    build: Callable[[CacheWriter], dict[str, Any]],
) -> TokenCache:
    """The token cache of ``source`` for these settings: reused when its key matches, else built by
    ``build(writer)`` (which appends every row and returns extra metadata) and installed atomically.

    Raises:
        NibbleError: a missing ``source``, or whatever ``build`` raises about the data (nothing is left behind).
    """
    source = check_data_path(source)
    identity = source_identity(source)
    key = {"format": CACHE_FORMAT, "source": identity, "tokenizer": tokenizer_identity(tokenizer_dir), **settings}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]
    root = token_cache_root()
    directory = root / f"{source.name[:_NAME_CHARS]}-{digest}"
    if (directory / "meta.json").is_file():
        try:
            problem = TokenCache(directory).damage(columns)
        except (NibbleError, KeyError, ValueError, OSError) as exc:
            problem = str(exc)
        if problem is None:
            print(f"tokens: reusing {directory}", flush=True)
            return TokenCache(directory)
        print(f"tokens: {directory} is damaged ({problem}); tokenizing again", flush=True)
        shutil.rmtree(directory, ignore_errors=True)
    started = time.perf_counter()
    if not _writable(root):
        directory = Path(tempfile.mkdtemp(prefix="nibble-tokens-")) / directory.name
        atexit.register(shutil.rmtree, directory.parent, True)
        print(f"note: cannot write the token cache in {root}; tokenizing into {directory} for this run", flush=True)
    else:
        _remove_stale(root, identity)
    with staged_dir(directory, overwrite=True) as tmp:
        writer = CacheWriter(tmp, columns)
        writer.finish({"key": key, **build(writer)})
        if source_identity(source) != identity:
            raise NibbleError(f"{source}: changed while it was being read; run again once it is complete")
    size = sum(f.stat().st_size for f in directory.iterdir())
    print(
        f"tokens: {writer.rows:,} rows of {source.name} tokenized in {time.perf_counter() - started:.1f} s, "
        f"cached in {directory} ({size / 2**20:.1f} MiB; reused while the file, tokenizer and settings are unchanged)",
        flush=True,
    )
    return TokenCache(directory)


def _writable(root: Path) -> bool:
    """Whether a cache can be built under ``root`` (a directory that takes a new file)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            return True
    except OSError:
        return False


def _remove_stale(root: Path, identity: dict[str, Any]) -> None:
    """Delete caches of an earlier version of the same file, and builds staged so long ago they were killed."""
    for entry in root.iterdir():
        if ".tmp-" in entry.name:
            try:
                killed = time.time() - entry.stat().st_mtime > _STALE_STAGING_S
            except OSError:  # another build just finished or failed
                continue
            if killed:
                shutil.rmtree(entry, ignore_errors=True)
            continue
        meta_file = entry / "meta.json"
        try:
            cached = json.loads(meta_file.read_text(encoding="utf-8"))["key"]["source"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if cached.get("path") == identity["path"] and cached != identity:
            shutil.rmtree(entry, ignore_errors=True)
