"""Token sequences on disk: a data file is read and tokenized once, as a stream, into a cache directory of flat
arrays that later runs memory-map, so a dataset larger than memory trains with flat RAM.

A cache directory holds ``meta.json`` (what was cached and from what; column dtypes and lengths) and one raw
array per column: a ragged column ``name`` is ``name.bin`` (all rows' values, concatenated) plus
``name.offsets.bin`` (int64, rows + 1); a per-row column is ``name.bin``. It lives under
``$NIBBLE_TOKEN_CACHE`` (default ``<cache>/tokens``, where ``<cache>`` is ``$NIBBLE_CACHE`` or
``~/.cache/nibble``), named after the data file and a key over everything that changes the tokens: the file's
identity (resolved path, size, modification time), the tokenizer files, the ``tokenizers`` version and the
caller's settings. It is built under a temporary name and renamed when complete, so a killed build never
looks finished; building it anew for a changed file removes the caches of the file's older versions. On open,
one pass over its bytes checks each file's size, CRC-32 and (for token columns) that every id is below the
vocabulary; a cache that disagrees is built again, and one that cannot be written is built in memory instead.
"""

from __future__ import annotations

import array
import atexit
import errno
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from nibble.data.ragged import Ragged
from nibble.data.records import check_data_path
from nibble.errors import NibbleError
from nibble.io.fetch import cache_dir
from nibble.io.files import WriteError, file_identity, name_part, read_json_object, staged_dir

CACHE_FORMAT = 3  # 3: each file's CRC-32 in meta.json
TOKENIZER_IDENTITY_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
_FLUSH_VALUES = 1 << 16  # buffered values per column before a write: bounded memory, few system calls
_STALE_STAGING_S = 24 * 3600  # a build staged longer ago than this was killed
_CHECK_BYTES = 1 << 20  # read at once when verifying a cache on open (a small, fixed part of memory)
_WRITE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def token_cache_root() -> Path:
    """Where token caches live: ``$NIBBLE_TOKEN_CACHE``, else ``<nibble cache>/tokens``."""
    configured = os.environ.get("NIBBLE_TOKEN_CACHE")
    return Path(configured).expanduser() if configured else cache_dir() / "tokens"


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
    """Appends rows to the columns of a cache directory being built (see :func:`cached_tokens`), or to buffers
    in memory when ``directory`` is None.

    Values wait in compact ``array.array`` buffers (at most ``_FLUSH_VALUES`` per column) and are appended to
    the column files, so memory stays flat however many rows are written.
    """

    def __init__(self, directory: Path | None, columns: dict[str, Column]):
        self.directory, self.columns, self.rows = directory, columns, 0
        self.buffers: dict[str, io.BytesIO] = {}  # file name -> its bytes, without a directory
        self.crc: dict[str, int] = {}  # file name -> CRC-32 of what was written
        self._files = {name: self._open(f"{name}.bin") for name in columns}
        self._values = {name: array.array(_TYPECODES[c.dtype]) for name, c in columns.items()}
        self._written = dict.fromkeys(columns, 0)
        ragged = [name for name, c in columns.items() if c.ragged]
        self._offset_files = {name: self._open(f"{name}.offsets.bin") for name in ragged}
        self._offsets = {name: array.array("q", [0]) for name in ragged}

    def _open(self, file: str) -> Any:
        self.crc[file] = 0
        if self.directory is None:
            self.buffers[file] = io.BytesIO()
            return self.buffers[file]
        return open(self.directory / file, "wb")

    def append(self, **row: Sequence[int] | int) -> None:
        """One row: a sequence for each ragged column, a number for each per-row column."""
        for name, column in self.columns.items():
            values = self._values[name]
            if column.ragged:
                seq = row[name]
                if isinstance(seq, np.ndarray):  # (a long row: its bytes, not one Python int per value)
                    values.frombytes(memoryview(np.ascontiguousarray(seq, dtype=column.dtype)).cast("B"))
                else:
                    values.extend(seq)  # type: ignore[arg-type]
                self._offsets[name].append(self._written[name] + len(values))
            else:
                values.append(row[name])  # type: ignore[arg-type]
            if len(values) >= _FLUSH_VALUES or len(self._offsets.get(name, ())) >= _FLUSH_VALUES:
                self._flush(name)
        self.rows += 1

    def _flush(self, name: str) -> None:
        values = self._values[name]
        self._write(f"{name}.bin", self._files[name], values)
        self._written[name] += len(values)
        self._values[name] = array.array(values.typecode)
        if name in self._offsets:
            self._write(f"{name}.offsets.bin", self._offset_files[name], self._offsets[name])
            self._offsets[name] = array.array("q")

    def _write(self, file: str, f: Any, values: array.array) -> None:
        values.tofile(f)
        self.crc[file] = zlib.crc32(memoryview(values).cast("B"), self.crc[file])

    def finish(self, meta: dict[str, Any]) -> None:
        """Write what is buffered and ``meta.json`` (with the row count and the column layout)."""
        for name in self.columns:
            self._flush(name)
        if self.directory is not None:
            for f in chain(self._files.values(), self._offset_files.values()):
                f.close()
        layout = {
            name: {"dtype": c.dtype, "ragged": c.ragged, "values": self._written[name]}
            for name, c in self.columns.items()
        }
        self.meta = {**meta, "rows": self.rows, "columns": layout, "crc32": self.crc}
        if self.directory is not None:
            (self.directory / "meta.json").write_text(json.dumps(self.meta, ensure_ascii=False), encoding="utf-8")


class TokenCache:
    """An opened cache: its ``meta`` and its columns as memory maps of a directory's files (or views of a
    :class:`CacheWriter`'s buffers built without one)."""

    def __init__(self, directory: Path, writer: CacheWriter | None = None):
        self.directory = directory
        self.buffers = {file: b.getbuffer() for file, b in writer.buffers.items()} if writer else {}
        self.meta = writer.meta if writer else read_json_object(directory / "meta.json", "delete the directory")
        self.rows: int = self.meta["rows"]

    def damage(self, columns: dict[str, Column], bounds: dict[str, int]) -> str | None:
        """What is wrong with the cache (None: nothing): the columns asked for with their dtypes, every file of
        the size its counts give and of the CRC-32 meta.json records, each ragged column's offsets from 0,
        monotone, ending at its count, and the values of each column in ``bounds`` below its bound (a vocabulary
        size). One pass over the bytes, in blocks."""
        layout, rows, crc = self.meta.get("columns"), self.rows, self.meta.get("crc32")
        if type(rows) is not int or rows < 0 or not isinstance(layout, dict) or set(layout) != set(columns):
            return "meta.json does not describe these columns"
        if not isinstance(crc, dict):
            return "meta.json records no checksums"
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
                bound = bounds.get(name) if file == f"{name}.bin" else None
                problem = _check_file(path, crc.get(file), column.dtype if bound else None, bound)
                if problem:
                    return f"{file}: {problem}"
            if column.ragged:
                offsets = self._array(f"{name}.offsets.bin", "int64", rows + 1)
                if offsets[0] != 0 or offsets[-1] != values or bool((np.diff(offsets) < 0).any()):
                    return f"{name}.offsets.bin is not monotone from 0 to {values}"
        return None

    def _array(self, file: str, dtype: str, count: int) -> np.ndarray:
        if file in self.buffers:
            return np.frombuffer(self.buffers[file], dtype=dtype, count=count)
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


def _check_file(path: Path, crc: Any, dtype: str | None, bound: int | None) -> str | None:
    """What is wrong with one cache file: a CRC-32 other than ``crc``, or (with a ``bound``) a ``dtype`` value
    not below it; read in blocks of ``_CHECK_BYTES`` (a multiple of every item size)."""
    found, top = 0, -1
    with open(path, "rb") as f:
        while block := f.read(_CHECK_BYTES):
            found = zlib.crc32(block, found)
            if bound is not None:
                top = max(top, int(np.frombuffer(block, dtype=dtype).max()))
    if found != crc:
        return "its checksum differs from meta.json's"
    if bound is not None and top >= bound:
        return f"holds id {top}, not below the vocabulary's {bound}"
    return None


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
    bounds: dict[str, int] | None = None,
) -> TokenCache:
    """The token cache of ``source`` for these settings: reused when its key matches and it passes
    :meth:`TokenCache.damage` (``bounds``: column -> the number its values stay below, a vocabulary size), else
    built by ``build(writer)`` (which appends every row and returns extra metadata) and installed atomically.
    A cache that cannot be written (a full disk, permissions) is said in one line and built in memory.

    Raises:
        NibbleError: a missing ``source``, or whatever ``build`` raises about the data (nothing is left behind).
    """
    source = check_data_path(source)
    identity = source_identity(source)
    key = {"format": CACHE_FORMAT, "source": identity, "tokenizer": tokenizer_identity(tokenizer_dir), **settings}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:20]
    root = token_cache_root()
    directory = root / f"{name_part(source.name)}-{digest}"
    if (directory / "meta.json").is_file():
        try:
            problem = TokenCache(directory).damage(columns, bounds or {})
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

    def fill(writer: CacheWriter) -> CacheWriter:
        writer.finish({"key": key, **build(writer)})
        if source_identity(source) != identity:
            raise NibbleError(f"{source}: changed while it was being read; run again once it is complete")
        return writer

    try:
        with staged_dir(directory, overwrite=True) as tmp:
            writer = fill(CacheWriter(tmp, columns))
    except WriteError as exc:
        if exc.cause.errno not in _WRITE_ERRORS:
            raise
        print(f"note: cannot write the token cache ({exc}); tokenizing into memory for this run", flush=True)
        return TokenCache(directory, fill(CacheWriter(None, columns)))
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
