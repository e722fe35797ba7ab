"""Batches: one padding routine for every task, file-order batches for evaluation, and the resumable
stream of shuffled training batches."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from nibble.errors import NibbleError

# Tokens per example unless a run or a command says otherwise: the one default of training, eval and predict.
MAX_SEQ_LEN = 256


def truncation_note(
    source: object,
    max_seq_len: int,
    *,
    rows: int,
    cut: int,
    dropped: int,
    tokens: int,
    longest: int,
    what: str = "tokens",
    at_least: bool = False,
) -> str | None:
    """The one line saying what ``--max-seq-len`` cut from ``source``, or None when nothing was cut: ``cut`` of
    ``rows`` rows, ``dropped`` of ``tokens`` counted ``what`` lost, and the longest row's tokens, which is the
    --max-seq-len that keeps every row whole. ``at_least``: some rows were cut before being tokenized in full, so
    ``dropped`` and ``longest`` are lower bounds."""
    if not cut:
        return None
    share = 100 * dropped / tokens if tokens else 0.0
    bound = "at least " if at_least else ""
    fix = f"--max-seq-len {longest} keeps every row whole"
    if at_least:
        fix = "only its start was tokenized: keeping it whole takes a larger --max-seq-len still"
    return (
        f"{source}: {cut:,} of {rows:,} rows cut to --max-seq-len {max_seq_len}, dropping {bound}{share:.1f}% of the "
        f"{what} ({dropped:,} of {tokens:,}); the longest row has {bound}{longest:,} tokens ({fix})"
    )


def pad_sequences(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    """Right-pad integer sequences with ``value`` to the longest: a long tensor [B, T]."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for row, seq in enumerate(seqs):
        out[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.long)
    return out


def pad_batch(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """``input_ids`` [B, T] right-padded with ``pad_id``, the ``attention_mask`` [B, T] marking real tokens and
    ``token_index`` [N]: the flat positions ``b * T + t`` of the N real tokens, row after row (what the model's
    token layout needs, built here from the rows' lengths so that no step reads it back from the device; its
    length is the batch's real-token count, see :func:`real_tokens`)."""
    lengths = [len(seq) for seq in ids]
    input_ids = pad_sequences(ids, pad_id)
    width = input_ids.shape[1]
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    starts = np.repeat(np.arange(len(lengths), dtype=np.int64) * width, lengths)
    within = np.arange(sum(lengths), dtype=np.int64) - np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
    return {"input_ids": input_ids, "attention_mask": mask, "token_index": torch.from_numpy(starts + within)}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The real (not padding) tokens of a :func:`pad_batch` batch, from its shapes alone (no tensor is read)."""
    return batch["token_index"].shape[0]


class Dataset(Protocol):
    """Examples that batch themselves (any task's data); ``subset`` keeps some of them (a validation split). Data
    that also has ``lengths()`` (tokens of each example, int64 [N]) lets the memory planner count the run's real
    batches."""

    def __len__(self) -> int: ...

    def collate(self, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]: ...

    def subset(self, indices: Sequence[int]) -> Dataset: ...


def iter_batches(data: Dataset, batch_size: int, pad_id: int) -> Iterator[tuple[range, dict[str, torch.Tensor]]]:
    """Batches in file order (for evaluation and prediction), with their row indices."""
    for start in range(0, len(data), batch_size):
        chunk = range(start, min(start + batch_size, len(data)))
        yield chunk, data.collate(chunk, pad_id)


class BatchStream:
    """An endless, resumable stream of training batches over seeded per-epoch shuffles.

    Epoch ``e`` visits a permutation drawn from ``(seed, e)`` (no sorting by length), optionally with the
    examples of minority groups repeated up to the size of the largest (``groups``: one group id per
    example, e.g. its class). The whole state is the number of batches already taken (``position``), so a
    resumed run continues with the very next batch.

    With ``part = (rank, world)`` the stream is one rank's share of a data-parallel run: ``batch_size`` is the
    global micro-batch, every rank draws the same order, and :meth:`next_batch` collates only this rank's
    contiguous slice of each batch (slices differ by at most one row). A rank whose slice of a short last batch
    is empty gets the batch's first row instead, with ``stand_in`` set: its loss must count for nothing.
    """

    def __init__(
        self,
        data: Dataset,
        batch_size: int,
        pad_id: int,
        seed: int,
        groups: Sequence[int] | None = None,
        part: tuple[int, int] = (0, 1),
    ):
        if batch_size < 1:
            raise NibbleError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.pad_id, self.seed = data, batch_size, pad_id, seed
        self.part = part
        self.stand_in = False
        group_of = np.asarray(groups if groups is not None else [], dtype=np.int64)
        keys, counts = np.unique(group_of, return_counts=True)
        members = np.split(np.argsort(group_of, kind="stable"), np.cumsum(counts)[:-1])  # each group's rows, ascending
        self.by_group: dict[int, np.ndarray] = dict(zip(keys.tolist(), members, strict=True)) if len(keys) else {}
        largest = max((len(v) for v in self.by_group.values()), default=0)
        self.epoch_size = largest * len(self.by_group) if self.by_group else len(data)
        self.batches_per_epoch = math.ceil(self.epoch_size / batch_size)
        self.position = 0
        self._order: tuple[int, np.ndarray] | None = None

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The example indices epoch ``epoch`` visits, in order."""
        rng = np.random.default_rng([self.seed, epoch])
        indices = np.arange(len(self.data))
        if self.by_group:
            largest = max(len(v) for v in self.by_group.values())
            extra = [
                members[rng.integers(0, len(members), largest - len(members))]
                for _, members in sorted(self.by_group.items())
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
        rank, world = self.part
        if world > 1:
            mine = np.array_split(chosen, world)[rank]
            self.stand_in = len(mine) == 0
            chosen = chosen[:1] if self.stand_in else mine
        return self.data.collate(chosen, self.pad_id)

    def most_tokens(self, batches: int) -> int | None:
        """The most tokens (the sum of its rows' lengths, on this rank) of the next ``batches`` batches: what a
        step's activations scale with, since padding is never computed; None for data without ``lengths()``.
        Reads the order, collates nothing."""
        if not hasattr(self.data, "lengths"):
            return None
        lengths = np.asarray(self.data.lengths(), dtype=np.int64)
        rank, world = self.part
        most, position, end = 0, self.position, self.position + max(batches, 0)
        while position < end:
            epoch, index = divmod(position, self.batches_per_epoch)
            order = self.epoch_order(epoch)
            stop = min(self.batches_per_epoch, index + end - position)
            for b in range(index, stop):
                chosen = order[b * self.batch_size : (b + 1) * self.batch_size]
                mine = np.array_split(chosen, world)[rank] if world > 1 else chosen
                most = max(most, int(lengths[mine if len(mine) else chosen[:1]].sum()))
            position += stop - index
        return most

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
        position = state["position"]
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise NibbleError(
                f"{source}: data position {position!r} is not a step count; resume from another checkpoint"
            )
        self.position = position
