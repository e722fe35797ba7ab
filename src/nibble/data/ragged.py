"""Rows of integers of varying length over one flat array (:class:`Ragged`), and those rows concatenated and cut
into pieces of one length (:class:`Packed`); the arrays may be memory maps of a token cache (see
:mod:`nibble.data.tokens`), which neither view copies."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from itertools import chain
from typing import Any

import numpy as np

_GATHER_VALUES = 1 << 22  # values read at once when summing over many rows


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
