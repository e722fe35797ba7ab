"""Classification data: JSONL/CSV rows -> label map -> token ids -> padded batches.

A row holds a text column and a label column. Labels are integers (used as class ids, 0..max) or
strings (mapped to ids in sorted order); a list of labels makes the row multi-label (trained with
BCE). Every problem with a row is reported with the file and line number.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from nibble.errors import NibbleError
from nibble.io import read_json_object

Label = int | str
CLASS_WEIGHTS = ("none", "inverse_freq", "sqrt_inverse")
_INT_TEXT = re.compile(r"-?\d+")


@dataclass
class Row:
    """One data row as read: the text, its raw label(s), and where it came from."""

    text: str
    label: Label | list[Label]
    line: int


@dataclass
class LabelMap:
    """The labels in id order and whether rows carry several labels each."""

    labels: list[Label]
    multi_label: bool = False

    def __post_init__(self) -> None:
        self._ids = {label: i for i, label in enumerate(self.labels)}

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def id_of(self, label: Label) -> int | None:
        return self._ids.get(label)

    def to_json(self) -> dict[str, Any]:
        return {"labels": self.labels, "multi_label": self.multi_label}

    @classmethod
    def from_json(cls, data: Any, source: str) -> LabelMap:
        labels = data.get("labels") if isinstance(data, dict) else None
        ok = isinstance(labels, list) and len(labels) >= 1
        if not ok or not all(_is_label(x) for x in labels) or len({type(x) for x in labels}) != 1:
            raise NibbleError(f"{source}: 'labels' must be a non-empty list of integers or strings")
        return cls(list(labels), bool(data.get("multi_label", False)))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        data = read_json_object(path, "the adapter or model directory needs its label map")
        return cls.from_json(data, str(path))


def _is_label(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool) and value >= 0) or isinstance(value, str)


def read_rows(path: str | Path, text_column: str = "text", label_column: str | None = "label") -> list[Row]:
    """Rows of a ``.jsonl``/``.json`` (one object per line) or ``.csv`` file.

    ``label_column=None`` reads texts only (for prediction). With the default ``"label"``, a file whose
    rows have ``labels`` and no ``label`` is read from ``labels``.

    Raises:
        NibbleError: missing file, unreadable line, missing column, or a label that is not an integer, a
            string, or a list of those; the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise NibbleError(f"{path}: no such data file; check the path")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        records = jsonl_records(path)
    elif suffix in (".csv", ".tsv"):
        records = _csv_records(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise NibbleError(f"{path}: unknown data format '{suffix}'; use .jsonl (one JSON object per line) or .csv")
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
            if isinstance(label, list):
                if not label or not all(_is_label(x) for x in label):
                    raise NibbleError(
                        f"{path} line {line}: '{column}' must be a non-empty list of integers >= 0 or strings"
                    )
            elif not _is_label(label):
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


def jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
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


def _csv_records(path: Path, delimiter: str):
    """CSV rows as dicts; integer-looking labels become ints and ``[...]`` cells JSON lists."""
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
    """Labels of the training rows: strings in sorted order, integers as ids 0..max.

    Raises:
        NibbleError: fewer than two distinct labels (nothing to learn).
    """
    multi = isinstance(rows[0].label, list)
    seen: set[Label] = set()
    for row in rows:
        seen.update(row.label if isinstance(row.label, list) else [row.label])
    if isinstance(next(iter(seen)), int):
        labels: list[Label] = list(range(max(seen) + 1))  # type: ignore[arg-type]
    else:
        labels = sorted(seen)  # type: ignore[type-var]
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


def stratified_split(targets: Sequence[int | list[int]], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)``: about ``fraction`` of each class (or label set) goes to val, seeded.

    A class with a single row keeps it in train. Both lists are in ascending order.
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
    """Right-pad a batch to its longest row: ``input_ids``/``attention_mask`` [B, T] and ``labels``.

    ``labels`` is [B] (long) for single-label data and a multi-hot [B, num_labels] (fp32) for multi-label.
    """
    t = max(len(seq) for seq in ids)
    input_ids = torch.full((len(ids), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), t), dtype=torch.long)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if targets is not None:
        if multi_label:
            labels = torch.zeros((len(ids), num_labels), dtype=torch.float32)
            for row, target in enumerate(targets):
                labels[row, target] = 1.0
        else:
            labels = torch.as_tensor(targets, dtype=torch.long)
        batch["labels"] = labels
    return batch


class Dataset(Protocol):
    """Examples that batch themselves: classification or instruction data."""

    def __len__(self) -> int: ...

    def collate(self, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]: ...


class BatchStream:
    """An endless, resumable stream of training batches over seeded per-epoch shuffles.

    Epoch ``e`` visits a permutation drawn from ``(seed, e)`` (no sorting by length), optionally with
    minority classes oversampled to the size of the largest class (classification data only; any
    :class:`Dataset` streams otherwise). The whole state is the number of batches already taken
    (``position``), so a resumed run continues with the very next batch.
    """

    def __init__(self, data: Dataset, batch_size: int, pad_id: int, seed: int, oversample: bool = False):
        if batch_size < 1:
            raise NibbleError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.pad_id, self.seed = data, batch_size, pad_id, seed
        self.by_class: dict[int, list[int]] | None = None
        if oversample and not isinstance(data, ClassificationData):
            raise NibbleError("oversample needs classification data (it balances the classes)")
        if oversample and not data.label_map.multi_label:
            self.by_class = {}
            for i, t in enumerate(data.targets):
                self.by_class.setdefault(int(t), []).append(i)  # type: ignore[arg-type]
        largest = max((len(v) for v in self.by_class.values()), default=0) if self.by_class else 0
        self.epoch_size = largest * len(self.by_class) if self.by_class else len(data)
        self.batches_per_epoch = math.ceil(self.epoch_size / batch_size)
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example indices epoch ``epoch`` visits, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        indices = np.arange(len(self.data))
        if self.by_class:
            largest = max(len(v) for v in self.by_class.values())
            extra = [
                np.asarray(members)[rng.integers(0, len(members), largest - len(members))]
                for _, members in sorted(self.by_class.items())
            ]
            indices = np.concatenate([indices, *extra])
        return indices[rng.permutation(len(indices))]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The batch at ``position`` (then advance); the last batch of an epoch may be smaller."""
        epoch, index = divmod(self.position, self.batches_per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, self.epoch_order(epoch))
        chosen = self._order[1][index * self.batch_size : (index + 1) * self.batch_size]
        self.position += 1
        return self.data.collate(chosen, self.pad_id)

    @property
    def epoch(self) -> float:
        """Epochs completed so far, fractional."""
        return self.position / self.batches_per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "examples": len(self.data), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int], source: str) -> None:
        """Continue from a saved position; the data, seed and batch size must be the ones it was saved with."""
        mine = self.state_dict()
        for key in ("examples", "seed", "batch_size"):
            if state.get(key) != mine[key]:
                raise NibbleError(
                    f"{source}: the checkpoint was taken with {key} {state.get(key)}, this run has {mine[key]}; "
                    "resume with the same data, seed and batch size"
                )
        self.position = int(state["position"])


def iter_batches(data: Dataset, batch_size: int, pad_id: int) -> Iterator[tuple[range, dict[str, torch.Tensor]]]:
    """Batches in file order (for evaluation and prediction), with their row indices."""
    for start in range(0, len(data), batch_size):
        chunk = range(start, min(start + batch_size, len(data)))
        yield chunk, data.collate(chunk, pad_id)


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
