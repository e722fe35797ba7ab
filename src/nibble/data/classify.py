"""Classification data: rows with a text and a label -> label map -> token ids -> padded batches.

A row holds a text column and a label column. Labels are strings (mapped to ids in sorted order) or
integers: class ids 0..max when they are dense (at least half of the ids 0..max occur in the training
data, so the head has at most twice the classes the data shows); sparse integers (say 3 and 2000000) are
mapped like strings, in ascending order, with a warning. A list of labels makes the row multi-label
(trained with BCE). Empty labels are refused. Every problem with a row is reported with the file and
line number.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nibble.data.batching import pad_batch
from nibble.data.records import read_records
from nibble.errors import NibbleError
from nibble.io.runinfo import Label, LabelMap, is_label

CLASS_WEIGHTS = ("none", "inverse_freq", "sqrt_inverse")


@dataclass
class Row:
    """One data row as read: the text, its raw label(s), and where it came from."""

    text: str
    label: Label | list[Label]
    line: int


def read_rows(path: str | Path, text_column: str = "text", label_column: str | None = "label") -> list[Row]:
    """Rows of a ``.jsonl``/``.json`` (one object per line) or ``.csv`` file.

    ``label_column=None`` reads texts only (for prediction). With the default ``"label"``, a file whose
    rows have ``labels`` and no ``label`` is read from ``labels``.

    Raises:
        NibbleError: missing file, unreadable line, missing column, or a label that is not an integer, a
            string, or a list of those; the message names the file and line.
    """
    path = Path(path)
    records = read_records(path)
    rows: list[Row] = []
    column = label_column
    for line, record in records:
        if column == "label" and not rows and "label" not in record and "labels" in record:
            column = "labels"
        if text_column not in record:
            fields = ", ".join(map(str, record)) or "none"
            raise NibbleError(
                f"{path} line {line}: no '{text_column}' field (fields: {fields}); set --text-column to the text field"
            )
        text = record[text_column]
        if not isinstance(text, str):
            raise NibbleError(f"{path} line {line}: '{text_column}' must be a string, got {type(text).__name__}")
        label: Label | list[Label] = -1
        if column is not None:
            if column not in record:
                fields = ", ".join(map(str, record))
                raise NibbleError(
                    f"{path} line {line}: no '{column}' field (fields: {fields}); set --label-column to the label field"
                )
            label = record[column]
            if any(isinstance(x, str) and not x.strip() for x in (label if isinstance(label, list) else [label])):
                raise NibbleError(f"{path} line {line}: '{column}' is empty; give every row a label or remove it")
            if isinstance(label, list):
                if not label or not all(is_label(x) for x in label):
                    raise NibbleError(
                        f"{path} line {line}: '{column}' must be a non-empty list of integers >= 0 or strings"
                    )
            elif not is_label(label):
                raise NibbleError(
                    f"{path} line {line}: '{column}' must be an integer >= 0, a string, or a list of those; "
                    f"got {json.dumps(label)}"
                )
        rows.append(Row(text, label, line))
    if not rows:
        raise NibbleError(f"{path}: holds no rows; add data or fix the path")
    if column is not None:
        _check_consistent(rows, path, column)
    return rows


def _check_consistent(rows: list[Row], path: Path, column: str) -> None:
    first = rows[0]
    multi = isinstance(first.label, list)
    kind = _kind(first.label)
    for row in rows:
        if isinstance(row.label, list) != multi:
            raise NibbleError(
                f"{path} line {row.line}: '{column}' mixes single labels and lists; use lists on every row"
            )
        if _kind(row.label) != kind:
            raise NibbleError(f"{path} line {row.line}: '{column}' mixes integer and string labels; use one kind")


def _kind(label: Label | list[Label]) -> type:
    values = label if isinstance(label, list) else [label]
    kinds = {type(v) for v in values}
    return kinds.pop() if len(kinds) == 1 else object


def build_label_map(rows: Sequence[Row], source: str | Path) -> LabelMap:
    """Labels of the training rows: strings in sorted order; integers as ids 0..max when dense (at least
    half of 0..max occur), else in ascending order like strings, with a warning on stderr.

    Raises:
        NibbleError: fewer than two distinct labels (nothing to learn).
    """
    multi = isinstance(rows[0].label, list)
    seen: set[Label] = set()
    for row in rows:
        seen.update(row.label if isinstance(row.label, list) else [row.label])
    labels: list[Label] = sorted(seen)  # type: ignore[type-var]
    if isinstance(labels[0], int):
        top = int(labels[-1])
        if top + 1 <= 2 * len(labels):
            labels = list(range(top + 1))
        else:
            print(
                f"warning: {source}: integer labels are sparse ({len(labels)} distinct, up to {top}); using them "
                f"as {len(labels)} classes in ascending order instead of as class ids 0..{top}",
                file=sys.stderr,
            )
    if len(labels) < 2:
        raise NibbleError(f"{source}: every row has the label {labels[0]!r}; a classifier needs at least two labels")
    return LabelMap(labels, multi)


def encode_labels(rows: Sequence[Row], label_map: LabelMap, source: str | Path) -> list[int | list[int]]:
    """Class ids (or lists of ids for multi-label rows); unknown labels are errors naming the line."""
    out: list[int | list[int]] = []
    for row in rows:
        if isinstance(row.label, list) != label_map.multi_label:
            want = "lists of labels" if label_map.multi_label else "single labels"
            raise NibbleError(f"{source} line {row.line}: the training data has {want}; this row does not")
        ids = []
        for label in row.label if isinstance(row.label, list) else [row.label]:
            i = label_map.id_of(label)
            if i is None:
                known = ", ".join(map(str, label_map.labels))
                raise NibbleError(
                    f"{source} line {row.line}: label {label!r} is not one of the training labels ({known}); "
                    "fix the row or add the label to the training data"
                )
            ids.append(i)
        out.append(sorted(set(ids)) if label_map.multi_label else ids[0])
    return out


@dataclass
class ClassificationData:
    """Tokenized examples: ``ids[i]`` (list of token ids) and ``targets[i]`` (class id or list of ids)."""

    ids: list[list[int]]
    targets: list[int | list[int]]
    label_map: LabelMap
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int]) -> ClassificationData:
        return ClassificationData(
            [self.ids[i] for i in indices],
            [self.targets[i] for i in indices],
            self.label_map,
            [self.lines[i] for i in indices] if self.lines else [],
        )

    def collate(self, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The padded batch of the examples at ``indices`` (see :func:`collate`)."""
        lm = self.label_map
        targets = [self.targets[i] for i in indices] if self.targets else None
        return collate([self.ids[i] for i in indices], targets, pad_id, lm.num_labels, lm.multi_label)

    def class_counts(self) -> list[int]:
        """Rows per class (for multi-label: rows that carry each label)."""
        counts = Counter(t for target in self.targets for t in (target if isinstance(target, list) else [target]))
        return [counts.get(i, 0) for i in range(self.label_map.num_labels)]


def tokenize_rows(rows: Sequence[Row], tokenizer, max_seq_len: int, source: str | Path) -> list[list[int]]:
    """Token ids per row, truncated to ``max_seq_len``; a row that yields no tokens is an error."""
    ids = tokenizer.encode_batch([r.text for r in rows], max_length=max_seq_len)
    for row, seq in zip(rows, ids, strict=True):
        if not seq:
            raise NibbleError(f"{source} line {row.line}: the text is empty; remove the row or give it text")
    return ids


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
                labels[row, target] = 1.0
        else:
            labels = torch.as_tensor(targets, dtype=torch.long)
        batch["labels"] = labels
    return batch


def load_classification(
    path: str | Path,
    tokenizer,
    *,
    text_column: str = "text",
    label_column: str = "label",
    max_seq_len: int = 512,
    label_map: LabelMap | None = None,
) -> ClassificationData:
    """Read, label and tokenize a data file; the label map is built from it unless one is given."""
    rows = read_rows(path, text_column, label_column)
    label_map = label_map if label_map is not None else build_label_map(rows, path)
    targets = encode_labels(rows, label_map, path)
    ids = tokenize_rows(rows, tokenizer, max_seq_len, path)
    return ClassificationData(ids, targets, label_map, [r.line for r in rows])
