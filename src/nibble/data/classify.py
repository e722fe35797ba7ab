"""Classification data: rows with a text and a label -> label map -> token ids -> padded batches.

A row holds a text column and a label column. Labels are strings (mapped to ids in sorted order) or
integers: class ids 0..max when they are dense (at least half of the ids 0..max occur in the training
data, so the head has at most twice the classes the data shows); sparse integers (say 3 and 2000000) are
mapped like strings, in ascending order, with a warning. A list of labels makes the row multi-label
(trained with BCE). Empty labels are refused. Every problem with a row is reported with the file and
line (or row) number.

Rows are read and tokenized as a stream into a token cache on disk (:mod:`nibble.data.tokens`) together with
each row's labels, numbered in the order they first appear; the label map is built from the distinct labels
alone. A :class:`ClassificationData` reads token ids from the memory-mapped cache, so memory does not grow
with the file (a few bytes per row for targets and indices).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nibble.data.batching import MAX_SEQ_LEN, pad_batch, truncation_note
from nibble.data.ragged import Ragged
from nibble.data.records import place, read_records
from nibble.data.tokens import Column, cached_tokens
from nibble.errors import NibbleError
from nibble.io.runinfo import Label, LabelMap, is_label
from nibble.io.tokenizer import Truncated

CLASS_WEIGHTS = ("none", "inverse_freq", "sqrt_inverse")
# Rows tokenized per batch while caching: at most this many rows or characters, since the tokenizer's output
# (offsets, masks, overflow) takes about 100 bytes per token before truncation.
_TOKENIZE_ROWS, _TOKENIZE_CHARS = 512, 1 << 16
CACHE_COLUMNS = {"ids": Column("uint32"), "lines": Column("int64", ragged=False), "targets": Column("int32")}


@dataclass
class Row:
    """One data row as read: the text, its raw label(s), and where it came from."""

    text: str
    label: Label | list[Label]
    line: int


def iter_rows(path: str | Path, text_column: str = "text", label_column: str | None = "label") -> Iterator[Row]:
    """Rows of a data file (any format :func:`nibble.data.records.read_records` reads), one at a time.

    ``label_column=None`` reads texts only (for prediction). With the default ``"label"``, a file whose
    rows have ``labels`` and no ``label`` is read from ``labels``. Every row's labels must be of the kind of
    the first row's (single or lists; integers or strings).

    Raises:
        NibbleError: missing file, unreadable line, missing column, a label that is not an integer, a
            string, or a list of those, labels of mixed kinds, or no rows; the message names the file and line.
    """
    path = Path(path)
    column = label_column
    first: Row | None = None
    for line, record in read_records(path):
        if column == "label" and first is None and "label" not in record and "labels" in record:
            column = "labels"
        if text_column not in record:
            fields = ", ".join(map(str, record)) or "none"
            raise NibbleError(
                f"{place(path, line)}: no '{text_column}' field (fields: {fields}); set --text-column to the text field"
            )
        text = record[text_column]
        if not isinstance(text, str):
            raise NibbleError(f"{place(path, line)}: '{text_column}' must be a string, got {type(text).__name__}")
        label: Label | list[Label] = -1
        if column is not None:
            if column not in record:
                fields = ", ".join(map(str, record))
                raise NibbleError(
                    f"{place(path, line)}: no '{column}' field (fields: {fields}); "
                    "set --label-column to the label field"
                )
            label = record[column]
            if any(isinstance(x, str) and not x.strip() for x in (label if isinstance(label, list) else [label])):
                raise NibbleError(f"{place(path, line)}: '{column}' is empty; give every row a label or remove it")
            if isinstance(label, list):
                if not label or not all(is_label(x) for x in label):
                    raise NibbleError(
                        f"{place(path, line)}: '{column}' must be a non-empty list of integers >= 0 or strings"
                    )
            elif not is_label(label):
                raise NibbleError(
                    f"{place(path, line)}: '{column}' must be an integer >= 0, a string, or a list of those; "
                    f"got {_shown(label)} (cast a decimal, timestamp or binary column to strings)"
                )
        row = Row(text, label, line)
        if column is not None and first is not None:
            _check_consistent(first, row, path, column)
        first = first or row
        yield row
    if first is None:
        raise NibbleError(f"{path}: holds no rows; add data or fix the path")


def _shown(value: object) -> str:
    """``value`` as the row holds it, for an error: JSON where it is JSON, else its type and text (a parquet
    decimal, timestamp or binary cell)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = f"{type(value).__name__} {value!s:.60}"
    return text if len(text) <= 80 else text[:77] + "..."


def read_rows(path: str | Path, text_column: str = "text", label_column: str | None = "label") -> list[Row]:
    """All rows of :func:`iter_rows` in a list (for data that fits in memory)."""
    return list(iter_rows(path, text_column, label_column))


def _check_consistent(first: Row, row: Row, path: Path, column: str) -> None:
    if isinstance(row.label, list) != isinstance(first.label, list):
        raise NibbleError(f"{place(path, row.line)}: '{column}' mixes single labels and lists; use lists on every row")
    if _kind(row.label) != _kind(first.label):
        raise NibbleError(f"{place(path, row.line)}: '{column}' mixes integer and string labels; use one kind")


def _kind(label: Label | list[Label]) -> type:
    values = label if isinstance(label, list) else [label]
    kinds = {type(v) for v in values}
    return kinds.pop() if len(kinds) == 1 else object


def build_label_map(labels: Iterable[Label], multi_label: bool, source: str | Path) -> LabelMap:
    """The label map of the distinct training labels: strings in sorted order; integers as ids 0..max when
    dense (at least half of 0..max occur), else in ascending order like strings, with a warning on stderr.

    Raises:
        NibbleError: fewer than two distinct labels (nothing to learn).
    """
    ordered: list[Label] = sorted(set(labels))  # type: ignore[type-var]
    if isinstance(ordered[0], int):
        top = int(ordered[-1])
        if top + 1 <= 2 * len(ordered):
            ordered = list(range(top + 1))
        else:
            print(
                f"warning: {source}: integer labels are sparse ({len(ordered)} distinct, up to {top}); using them "
                f"as {len(ordered)} classes in ascending order instead of as class ids 0..{top}",
                file=sys.stderr,
            )
    if len(ordered) < 2:
        raise NibbleError(f"{source}: every row has the label {ordered[0]!r}; a classifier needs at least two labels")
    return LabelMap(ordered, multi_label)


@dataclass
class ClassificationData:
    """Tokenized examples: ``ids[i]`` (token ids), ``targets`` (class ids [N], or a :class:`Ragged` of id lists
    for multi-label data, each ascending; None for unlabelled rows) and the source line of each row.

    Lists are accepted for every field (small data built in memory).
    """

    ids: Ragged
    targets: np.ndarray | Ragged | None
    label_map: LabelMap
    lines: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.ids, Ragged):
            self.ids = Ragged.from_lists(self.ids)
        if self.targets is not None and not isinstance(self.targets, (np.ndarray, Ragged)):
            multi = self.label_map.multi_label
            self.targets = Ragged.from_lists(self.targets) if multi else np.asarray(self.targets, dtype=np.int64)
        if self.lines is None:
            self.lines = np.arange(1, len(self.ids) + 1)
        self.lines = np.asarray(self.lines, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        """Tokens of each example (int64 [N])."""
        return self.ids.lengths()

    def subset(self, indices: Sequence[int] | np.ndarray) -> ClassificationData:
        indices = np.asarray(indices, dtype=np.int64)
        targets = (
            None
            if self.targets is None
            else (self.targets.subset(indices) if isinstance(self.targets, Ragged) else self.targets[indices])
        )
        return ClassificationData(self.ids.subset(indices), targets, self.label_map, self.lines[indices])

    def collate(self, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The padded batch of the examples at ``indices`` (see :func:`collate`)."""
        lm = self.label_map
        if self.targets is None:
            targets = None
        elif isinstance(self.targets, Ragged):
            targets = [self.targets[i] for i in indices]
        else:
            targets = self.targets[np.asarray(indices, dtype=np.int64)]
        return collate([self.ids[i] for i in indices], targets, pad_id, lm.num_labels, lm.multi_label)

    def split_keys(self) -> np.ndarray | list[tuple[int, ...]]:
        """What a stratified split groups rows by: the class id, or the tuple of ids of a multi-label row."""
        if isinstance(self.targets, Ragged):
            return [tuple(t.tolist()) for t in self.targets]
        return self.targets if self.targets is not None else np.zeros(len(self), dtype=np.int64)

    def class_counts(self) -> list[int]:
        """Rows per class (for multi-label: rows that carry each label)."""
        flat = self.targets.concat() if isinstance(self.targets, Ragged) else self.targets
        return np.bincount(flat, minlength=self.label_map.num_labels).tolist()


def tokenize_rows(rows: Sequence[Row], tokenizer, max_seq_len: int, source: str | Path) -> Truncated:
    """Token ids per row, truncated to ``max_seq_len`` (work bounded by it, not by the text: see
    :meth:`nibble.io.tokenizer.Tokenizer.encode_truncated`), with what each cut dropped; a row that yields no
    tokens is an error."""
    result = tokenizer.encode_truncated([r.text for r in rows], max_seq_len)
    for row, seq in zip(rows, result.ids, strict=True):
        if not seq:
            raise NibbleError(f"{place(source, row.line)}: the text is empty; remove the row or give it text")
    return result


def class_weights(data: ClassificationData, scheme: str) -> torch.Tensor | None:
    """Per-class loss weights [num_labels] (fp32), or None for ``"none"``.

    Single-label: ``inverse_freq`` gives class c the weight N / (K * n_c) (N rows, K classes, n_c rows
    of c); ``sqrt_inverse`` its square root; a class without rows gets 0. Multi-label: the BCE
    positive weight n_neg_c / n_pos_c (or its square root); 1 for a label that is always or never on.
    """
    if scheme not in CLASS_WEIGHTS:
        raise NibbleError(f"class_weights: '{scheme}' is not one of {', '.join(CLASS_WEIGHTS)}")
    if scheme == "none":
        return None
    counts = torch.tensor(data.class_counts(), dtype=torch.float64)
    n, k = len(data), data.label_map.num_labels
    if data.label_map.multi_label:
        negatives = n - counts
        ratio = torch.where((counts > 0) & (negatives > 0), negatives / counts.clamp(min=1), torch.ones_like(counts))
    else:
        ratio = torch.where(counts > 0, n / (k * counts.clamp(min=1)), torch.zeros_like(counts))
    return (ratio.sqrt() if scheme == "sqrt_inverse" else ratio).float()


def collate(
    ids: Sequence[Sequence[int]],
    targets: Sequence[int | list[int]] | None,
    pad_id: int,
    num_labels: int,
    multi_label: bool,
) -> dict[str, torch.Tensor]:
    """A padded batch (see :func:`nibble.data.batching.pad_batch`) plus ``labels``: [B] class ids (long) for
    single-label data, a multi-hot [B, num_labels] (fp32) for multi-label data."""
    batch = pad_batch(ids, pad_id)
    if targets is not None:
        if multi_label:
            labels = torch.zeros((len(ids), num_labels), dtype=torch.float32)
            for row, target in enumerate(targets):
                labels[row, torch.as_tensor(target, dtype=torch.long)] = 1.0
        else:
            labels = torch.as_tensor(targets, dtype=torch.long)
        batch["labels"] = labels
    return batch


def load_classification(
    path: str | Path,
    tokenizer,
    *,
    text_column: str = "text",
    label_column: str | None = "label",
    max_seq_len: int = MAX_SEQ_LEN,
    label_map: LabelMap | None = None,
) -> ClassificationData:
    """Read, label and tokenize a data file through its token cache; the label map is built from the file's
    labels unless one is given. ``label_column=None`` reads texts only (``targets`` is None; pass the model's
    ``label_map``).

    Raises:
        NibbleError: a bad row (see :func:`iter_rows`), an empty text, fewer than two labels, or (with a given
            ``label_map``) a label the map does not hold or rows of the other kind (single vs lists).
    """
    settings = {
        "task": "classify",
        "text_column": text_column,
        "label_column": label_column,
        "max_seq_len": max_seq_len,
        "cut_counts": True,  # the meta counts what the cuts drop (caches from before, without, are built anew)
    }
    columns = CACHE_COLUMNS if label_column is not None else {k: v for k, v in CACHE_COLUMNS.items() if k != "targets"}

    def build(writer) -> dict:
        first: dict[Label, int] = {}  # label -> its number, in the order labels first appear
        multi = False
        batch: list[Row] = []
        chars = 0
        cuts = {"truncated": 0, "dropped": 0, "tokens": 0, "longest": 0, "longest_partial": False}

        def flush() -> None:
            result = tokenize_rows(batch, tokenizer, max_seq_len, path)
            cuts["truncated"] += result.cut
            for ids, beyond, partial in zip(*result, strict=True):
                cuts["dropped"] += beyond
                cuts["tokens"] += len(ids) + beyond
                if len(ids) + beyond > cuts["longest"]:
                    cuts["longest"], cuts["longest_partial"] = len(ids) + beyond, partial
            for row, ids in zip(batch, result.ids, strict=True):
                labels = row.label if isinstance(row.label, list) else [row.label]
                targets = sorted({first.setdefault(label, len(first)) for label in labels}) if label_column else []
                writer.append(ids=ids, lines=row.line, targets=targets)
            batch.clear()

        for row in iter_rows(path, text_column, label_column):
            multi = isinstance(row.label, list)
            batch.append(row)
            chars += len(row.text)
            if len(batch) == _TOKENIZE_ROWS or chars >= _TOKENIZE_CHARS:
                flush()
                chars = 0
        flush()
        return {"labels": list(first), "multi_label": multi, **cuts}

    cache = cached_tokens(path, tokenizer.path, settings, columns, build, bounds={"ids": len(tokenizer)})
    lines = cache.column("lines")
    meta = cache.meta
    if meta.get("truncated"):
        note = truncation_note(
            path,
            max_seq_len,
            rows=cache.rows,
            cut=meta["truncated"],
            dropped=meta["dropped"],
            tokens=meta["tokens"],
            longest=meta["longest"],
            at_least=meta["longest_partial"],
        )
        print(f"tokens: {note}", flush=True)
    if label_column is None:
        return ClassificationData(cache.ragged("ids"), None, label_map or LabelMap([]), lines)
    seen, multi = cache.meta["labels"], cache.meta["multi_label"]
    label_map = label_map if label_map is not None else build_label_map(seen, multi, path)
    if multi != label_map.multi_label:
        want = "lists of labels" if label_map.multi_label else "single labels"
        raise NibbleError(f"{place(path, int(lines[0]))}: the training data has {want}; this row does not")
    targets = _map_targets(cache.ragged("targets"), seen, label_map, lines, path)
    return ClassificationData(cache.ragged("ids"), targets, label_map, lines)


def _map_targets(
    cached: Ragged, seen: list[Label], label_map: LabelMap, lines: np.ndarray, source: str | Path
) -> np.ndarray | Ragged:
    """The cached label numbers as class ids of ``label_map``: [N] ids, or a Ragged of ascending ids (multi-label).

    Raises:
        NibbleError: a label ``label_map`` does not hold; names the first row that carries one.
    """
    ids = np.array([-1 if label_map.id_of(label) is None else label_map.id_of(label) for label in seen], np.int64)
    numbers = cached.values
    mapped = ids[numbers]
    if mapped.min(initial=0) < 0:
        position = int(np.argmax(mapped < 0))
        row = int(np.searchsorted(cached.offsets, position, side="right")) - 1
        known = ", ".join(map(str, label_map.labels))
        raise NibbleError(
            f"{place(source, int(lines[row]))}: label {seen[numbers[position]]!r} is not one of the training labels "
            f"({known}); fix the row or add the label to the training data"
        )
    if not label_map.multi_label:
        return mapped  # one label per row
    rows = np.repeat(np.arange(len(cached)), np.diff(cached.offsets))
    return Ragged(mapped[np.lexsort((mapped, rows))], cached.offsets)
