"""Records from data files: JSON Lines and CSV/TSV rows as ``(line number, dict)``, and seeded splits."""

from __future__ import annotations

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


def jsonl_records(path: Path) -> Iterator[Record]:
    """``(line number, object)`` for each non-blank line of a JSON Lines file.

    Raises:
        NibbleError: a line that is not JSON or not an object, or a file that is not UTF-8; names the line.
    """
    with open(path, encoding="utf-8") as f:
        try:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise NibbleError(f"{path} line {line_no}: not valid JSON ({exc.msg}); fix or remove it") from None
                if not isinstance(record, dict):
                    raise NibbleError(f"{path} line {line_no}: expected a JSON object (one example per line)")
                yield line_no, record
        except UnicodeDecodeError as exc:
            raise NibbleError(f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None


def csv_records(path: Path, delimiter: str = ",") -> Iterator[Record]:
    """CSV rows as dicts keyed by the header; integer-looking cells become ints and ``[...]`` cells JSON lists."""
    with open(path, encoding="utf-8", newline="") as f:
        try:
            reader = csv.reader(f, delimiter=delimiter)
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
        except UnicodeDecodeError as exc:
            raise NibbleError(f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None


def _csv_value(cell: str, path: Path, line: int) -> Any:
    stripped = cell.strip()
    if _INT_TEXT.fullmatch(stripped):
        return int(stripped)
    if stripped.startswith("["):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError:
            raise NibbleError(f"{path} line {line}: cell {stripped!r} starts with '[' but is not a JSON list") from None
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
