"""Records from data files as ``(line or row number, dict)``: JSON Lines, CSV/TSV, Parquet, Arrow, and Hugging Face
``datasets`` directories written by ``save_to_disk``; and seeded splits.

Parquet and Arrow files are read with ``pyarrow``, ``datasets`` directories with ``datasets``; both are optional
(``pip install nibble[data]``) and read in batches, so a file larger than memory streams through.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nibble.errors import NibbleError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
CSV_SUFFIXES = (".csv", ".tsv")
PARQUET_SUFFIXES = (".parquet", ".pq")
ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
FORMATS = ".jsonl, .csv/.tsv, .parquet, .arrow, or a directory written by datasets' save_to_disk"
_BATCH_ROWS = 1024  # rows per batch read from Parquet/Arrow/datasets: bounded memory, amortized conversion
_INT_TEXT = re.compile(r"-?\d+")

Record = tuple[int, dict[str, Any]]


def check_data_path(path: str | Path) -> Path:
    """``path`` as a data source nibble may read: a regular file, or a directory written by ``save_to_disk``
    (never a FIFO, a device or a pseudo file system's directory such as /proc, which would block or never end).

    Raises:
        NibbleError: a missing path, or one of another kind, naming it.
    """
    path = Path(path)
    if not path.exists():
        raise NibbleError(f"{path}: no such data file; check the path")
    if path.is_dir():
        if not any((path / name).is_file() for name in ("state.json", "dataset_dict.json")):
            raise NibbleError(f"{path}: a directory, but not one written by datasets' save_to_disk; use {FORMATS}")
    elif not path.is_file():
        raise NibbleError(f"{path}: not a regular file (a FIFO, socket or device); give a data file: {FORMATS}")
    return path


def read_records(path: str | Path) -> Iterator[Record]:
    """``(number, object)`` for every row of a data file or ``datasets`` directory (see the module docstring).

    The number is the line for ``.jsonl``/``.json``/``.ndjson`` and ``.csv``/``.tsv`` files and the 1-based row
    otherwise (:func:`place` words it). Rows are read lazily.

    Raises:
        NibbleError: a missing path, an unknown format, a missing optional package, or a row that cannot be
            read (naming the line).
    """
    path = check_data_path(path)
    if path.is_dir():
        return dataset_dir_records(path)
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return jsonl_records(path)
    if suffix in CSV_SUFFIXES:
        return csv_records(path, "\t" if suffix == ".tsv" else ",")
    if suffix in PARQUET_SUFFIXES:
        return parquet_records(path)
    if suffix in ARROW_SUFFIXES:
        return arrow_records(path)
    raise NibbleError(f"{path}: unknown data format '{suffix}'; use {FORMATS}")


def place(path: str | Path, number: int) -> str:
    """Where a record came from, for messages: ``"data.jsonl line 3"`` or ``"data.parquet row 3"``."""
    lines = Path(path).suffix.lower() in (*JSONL_SUFFIXES, *CSV_SUFFIXES)
    return f"{path} {'line' if lines else 'row'} {number}"


def _optional(module: str, package: str, path: Path):
    """Import an optional dependency, or explain in one line how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise NibbleError(
            f"{path}: reading this format needs the '{package}' package; pip install {package} (or nibble[data])"
        ) from None


def _batch_records(batches: Iterator[Any]) -> Iterator[Record]:
    """Rows of pyarrow record batches (or tables) as ``(1-based row, dict)``."""
    number = 0
    for batch in batches:
        for row in batch.to_pylist():
            number += 1
            yield number, row


def parquet_records(path: Path) -> Iterator[Record]:
    """``(row, object)`` for each row of a Parquet file, read a batch at a time (needs ``pyarrow``)."""
    parquet = _optional("pyarrow.parquet", "pyarrow", path)
    try:
        reader = parquet.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError subclasses for every kind of bad file
        raise NibbleError(f"{path}: not a readable Parquet file ({exc}); check the file") from None
    yield from _batch_records(reader.iter_batches(batch_size=_BATCH_ROWS))


def arrow_records(path: Path) -> Iterator[Record]:
    """``(row, object)`` for each row of an Arrow IPC file (the random-access or the stream format, which is
    what ``datasets`` writes), memory-mapped (needs ``pyarrow``)."""
    pa = _optional("pyarrow", "pyarrow", path)
    try:
        source = pa.memory_map(str(path))
        is_file_format = source.read(6) == b"ARROW1"
        source.seek(0)
        if is_file_format:
            reader = pa.ipc.open_file(source)
            batches: Iterator[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(pa.ipc.open_stream(source))
    except Exception as exc:  # ArrowInvalid and OSError subclasses
        raise NibbleError(f"{path}: not a readable Arrow file ({exc}); check the file") from None
    yield from _batch_records(batches)


def dataset_dir_records(path: Path) -> Iterator[Record]:
    """``(row, object)`` for each row of a directory written by ``datasets.Dataset.save_to_disk`` (needs
    ``datasets``); a ``DatasetDict`` directory must be narrowed to one of its splits.

    Raises:
        NibbleError: a directory ``datasets`` did not write, or a DatasetDict (naming its splits).
    """
    if (path / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in path.iterdir() if (p / "state.json").is_file())
        raise NibbleError(
            f"{path}: a DatasetDict with splits {', '.join(splits) or 'none'}; pass one split's directory, "
            f"e.g. {path / (splits[0] if splits else 'train')}"
        )
    if not (path / "state.json").is_file():
        raise NibbleError(f"{path}: a directory, but not one written by datasets' save_to_disk; use {FORMATS}")
    datasets = _optional("datasets", "datasets", path)
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, pyarrow errors
        raise NibbleError(f"{path}: datasets cannot load this directory ({exc}); save it again") from None
    yield from _batch_records(dataset.with_format("arrow").iter(batch_size=_BATCH_ROWS))


def text_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file (line endings kept), without a leading byte-order mark.

    Raises:
        NibbleError: a line that is not UTF-8, naming it.
    """
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if line_no == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise NibbleError(
                    f"{path} line {line_no}: not UTF-8 text (byte {exc.start + 1} of the line: {exc.reason}); "
                    "save the file as UTF-8"
                ) from None


def _json(text: str) -> Any:
    """``json.loads``, with every failure a ValueError (too deep nesting, integers of more than 4300 digits)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def jsonl_records(path: Path) -> Iterator[Record]:
    """``(line number, object)`` for each non-blank line of a JSON Lines file (UTF-8, with or without a BOM).

    Raises:
        NibbleError: a line that is not JSON, not an object, or not UTF-8; names the line.
    """
    for line_no, line in enumerate(text_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = _json(line)
        except ValueError as exc:  # JSONDecodeError, or one of _json's
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc).split(";")[0]
            raise NibbleError(f"{path} line {line_no}: not valid JSON ({reason}); fix or remove it") from None
        if not isinstance(record, dict):
            raise NibbleError(f"{path} line {line_no}: expected a JSON object (one example per line)")
        yield line_no, record


def csv_records(path: Path, delimiter: str = ",") -> Iterator[Record]:
    """CSV rows as dicts keyed by the header; integer-looking cells (up to 18 digits) become ints and ``[...]``
    cells JSON lists. The file is UTF-8, with or without a BOM."""
    reader = csv.reader(text_lines(path), delimiter=delimiter)
    try:
        header = next(reader, None)
        if header is None:
            return
        line_no = reader.line_num + 1
        for cells in reader:
            if cells:
                if len(cells) != len(header):
                    raise NibbleError(
                        f"{path} line {line_no}: {len(cells)} cells but the header has {len(header)}; "
                        "quote cells that contain the delimiter"
                    )
                yield line_no, {k: _csv_value(v, path, line_no) for k, v in zip(header, cells, strict=True)}
            line_no = reader.line_num + 1
    except csv.Error as exc:
        raise NibbleError(f"{path} line {reader.line_num}: bad CSV ({exc})") from None


def _csv_value(cell: str, path: Path, line: int) -> Any:
    stripped = cell.strip()
    if _INT_TEXT.fullmatch(stripped) and len(stripped) <= 18:  # longer digit strings stay text (ids, codes)
        return int(stripped)
    if stripped.startswith("["):
        try:
            return _json(stripped)
        except ValueError:
            raise NibbleError(
                f"{path} line {line}: cell {stripped[:40]!r} starts with '[' but is not a JSON list"
            ) from None
    return cell


def stratified_split(targets: Sequence[Any] | np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``(train, val)``: about ``fraction`` of each target value (a class, a label set, or one value
    for all rows) goes to val, seeded. A value with a single row keeps it in train. Both arrays ascend.

    ``targets`` may be an integer array (memory stays a few bytes per row) or any sequence of hashable
    values (lists count as tuples).
    """
    n = len(targets)
    if fraction <= 0:
        return np.arange(n), np.arange(0)
    if isinstance(targets, np.ndarray):
        unique, group_of = np.unique(targets, return_inverse=True)
        keys: list[Any] = unique.tolist()
    else:
        ids: dict[Any, int] = {}
        group_of = np.fromiter(
            (ids.setdefault(tuple(t) if isinstance(t, list) else t, len(ids)) for t in targets), np.int64, n
        )
        keys = list(ids)
    by_group = np.argsort(group_of, kind="stable")  # each group's rows, ascending
    bounds = np.concatenate([[0], np.cumsum(np.bincount(group_of, minlength=len(keys)))])
    rng = np.random.default_rng([seed, n])
    val: list[np.ndarray] = []
    for g in sorted(range(len(keys)), key=lambda g: repr(keys[g])):
        members = by_group[bounds[g] : bounds[g + 1]]
        n_val = min(round(fraction * len(members)), len(members) - 1)
        if n_val > 0:
            val.append(members[rng.permutation(len(members))[:n_val]])
    chosen = np.zeros(n, dtype=bool)
    if val:
        chosen[np.concatenate(val)] = True
    return np.flatnonzero(~chosen), np.flatnonzero(chosen)
