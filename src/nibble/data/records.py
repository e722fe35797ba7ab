"""Records from data files: JSON Lines and CSV/TSV rows as ``(line number, dict)``, and seeded splits."""

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
_INT_TEXT = re.compile(r"-?\d+")

Record = tuple[int, dict[str, Any]]


def read_records(path: str | Path) -> Iterator[Record]:
    """``(line number, object)`` for every row of a ``.jsonl``/``.json``/``.ndjson`` or ``.csv``/``.tsv`` file.

    Raises:
        NibbleError: a missing file, an unknown suffix, or a row that cannot be read (naming the line).
    """
    path = Path(path)
    if not path.is_file():
        raise NibbleError(f"{path}: no such data file; check the path")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return jsonl_records(path)
    if suffix in CSV_SUFFIXES:
        return csv_records(path, "\t" if suffix == ".tsv" else ",")
    raise NibbleError(f"{path}: unknown data format '{suffix}'; use .jsonl (one JSON object per line) or .csv")


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


def stratified_split(targets: Sequence[Any], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)``: about ``fraction`` of each target value (a class, a label set, or one value
    for all rows) goes to val, seeded. A value with a single row keeps it in train. Both lists ascend.
    """
    if fraction <= 0:
        return list(range(len(targets))), []
    groups: dict[Any, list[int]] = {}
    for i, t in enumerate(targets):
        groups.setdefault(tuple(t) if isinstance(t, list) else t, []).append(i)
    rng = np.random.default_rng([seed, len(targets)])
    val: list[int] = []
    for key in sorted(groups, key=repr):
        members = groups[key]
        n_val = min(round(fraction * len(members)), len(members) - 1)
        if n_val > 0:
            val.extend(members[j] for j in rng.permutation(len(members))[:n_val])
    chosen = set(val)
    return [i for i in range(len(targets)) if i not in chosen], sorted(val)
