"""Preference data: two completions of one prompt, the chosen one better (``--task preference``, ``--task reward``),
or single completions labelled desirable or not (``--task kto``) -> prompt and completion token ids.

Pair rows, in TRL's layouts:

- ``{"prompt": str, "chosen": str, "rejected": str}``: the texts are joined as written (``prompt + chosen``) and the
  EOS token appended to a completion that lacks it;
- ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``: rendered with the chat template (the
  prompt with the generation prompt, ``prompt + chosen`` as one conversation);
- ``{"chosen": [messages], "rejected": [messages]}``: the prompt is implicit, the messages both lists begin with.

An optional ``margin`` (a number) is read for ``--task reward``. Unpaired rows (KTO) are ``{"prompt", "completion",
"label"}`` with ``label`` true for a desirable completion, strings or lists of messages. As TRL does, the completion
starts where the tokens of the prompt alone and of prompt + completion first differ. Rows are read and tokenized once
into a token cache (:mod:`nibble.data.tokens`); truncation is a view: ``max_prompt_len`` keeps a prompt's last
tokens, then ``max_seq_len`` keeps a sequence's first ones. A bad row (a missing or mistyped field, chosen equal to
rejected, a rejected that does not continue the chosen one's prompt, an empty completion, a prompt that leaves no
completion token within ``max_seq_len``) stops the run with one line naming it, or with ``skip_bad_rows`` is counted
and left out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nibble.data.batching import pad_batch, truncation_note
from nibble.data.chat import parse_messages
from nibble.data.ragged import Ragged
from nibble.data.records import place, read_records
from nibble.data.tokens import Column, cached_tokens
from nibble.errors import NibbleError
from nibble.io.tokenizer import Tokenizer

Batch = dict[str, torch.Tensor]

PAIR_COLUMNS = {
    "prompt": Column("uint32"),
    "chosen": Column("uint32"),
    "rejected": Column("uint32"),
    "margin": Column("float32", ragged=False),
    "lines": Column("int64", ragged=False),
}
UNPAIRED_COLUMNS = {
    "prompt": Column("uint32"),
    "completion": Column("uint32"),
    "label": Column("uint8", ragged=False),
    "lines": Column("int64", ragged=False),
}


class BadRow(NibbleError):
    """A data row that cannot be trained on (``skip_bad_rows`` counts and leaves these out)."""


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _common_ids(a: np.ndarray, b: np.ndarray) -> int:
    """The length of the common prefix of two id arrays (no index per token)."""
    n = min(len(a), len(b))
    differ = a[:n] != b[:n]
    first = int(np.argmax(differ)) if n else 0
    return first if n and differ[first] else n


class _Encoder:
    """Prompt and completion ids of one row's texts or messages, as TRL's DPO and KTO trainers tokenize them."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.eos = tokenizer.special_tokens.get("eos_token")

    def encode(self, prompt: Any, completions: list[Any], where: str) -> tuple[np.ndarray, list[np.ndarray]]:
        """``(prompt ids, [completion ids, ...])`` (uint32 arrays: memory follows the tokens, see
        :meth:`nibble.io.tokenizer.Tokenizer.encode_positions`); the prompt ids end where every completion's
        tokens leave them."""
        tok = self.tokenizer
        if isinstance(prompt, str):
            texts = [c if self.eos is None or c.endswith(self.eos) else c + self.eos for c in completions]
            prompt_ids = tok.encode_positions(prompt)[0]
            full = [tok.encode_positions(prompt + c)[0] for c in texts]
        else:
            prompt_ids = tok.encode_positions(tok.apply_chat_template(prompt, add_generation_prompt=True))[0]
            full = [tok.encode_positions(tok.apply_chat_template(prompt + c))[0] for c in completions]
        cut = min(_common_ids(prompt_ids, ids) for ids in full)
        parts = [ids[cut:] for ids in full]
        if any(not len(p) for p in parts):
            raise BadRow(f"{where}: a completion has no tokens; give every completion some text")
        return prompt_ids[:cut], parts


def _field(record: dict[str, Any], key: str, where: str) -> Any:
    if record.get(key) is None:
        fields = ", ".join(map(str, record)) or "none"
        raise BadRow(f"{where}: no '{key}' field (fields: {fields})")
    return record[key]


def _same_kind(prompt: Any, completion: Any, key: str, where: str) -> Any:
    """``completion`` as a string (a string prompt) or a list of messages (a conversational one)."""
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise BadRow(f"{where}: '{key}' must be a string like the prompt, got {type(completion).__name__}")
        return completion
    return parse_messages(completion, key, where)


def pair_parts(record: dict[str, Any], where: str) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of one pair row (see the module docstring).

    Raises:
        BadRow: a missing or mistyped field, chosen equal to rejected, or lists of messages without a shared prompt
            followed by an assistant turn.
    """
    chosen, rejected = _field(record, "chosen", where), _field(record, "rejected", where)
    if record.get("prompt") is None:
        if isinstance(chosen, str) or isinstance(rejected, str):
            raise BadRow(f"{where}: no 'prompt' field; string pairs need one (only lists of messages imply it)")
        chosen, rejected = parse_messages(chosen, "chosen", where), parse_messages(rejected, "rejected", where)
        shared = _common_prefix(chosen, rejected)
        if shared == 0 or shared == len(chosen) or shared == len(rejected):
            what = "are the same conversation" if chosen == rejected else "do not begin with the same prompt messages"
            raise BadRow(f"{where}: 'chosen' and 'rejected' {what}; the rejected must answer the chosen's prompt")
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        prompt = record["prompt"]
        if not isinstance(prompt, str):
            prompt = parse_messages(prompt, "prompt", where)
        chosen, rejected = _same_kind(prompt, chosen, "chosen", where), _same_kind(prompt, rejected, "rejected", where)
    if chosen == rejected:
        raise BadRow(f"{where}: 'chosen' equals 'rejected'; a pair needs two different completions")
    for key, part in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(part, str) and part[0]["role"] != "assistant":
            raise BadRow(f"{where}: '{key}' must continue the prompt with an assistant message")
    return prompt, chosen, rejected


def _margin(record: dict[str, Any], where: str) -> float:
    value = record.get("margin", 0.0)
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise BadRow(f"{where}: 'margin' must be a finite number, got {value!r}")
    return float(value)


def _label(record: dict[str, Any], where: str) -> bool:
    value = _field(record, "label", where)
    if not isinstance(value, bool):
        raise BadRow(f"{where}: 'label' must be true (desirable) or false (undesirable), got {value!r}")
    return value


@dataclass
class Skipped:
    """Bad rows left out of a data file: how many, and the first one's message."""

    count: int = 0
    first: str | None = None

    def add(self, error: BadRow) -> None:
        self.count += 1
        self.first = self.first or str(error)

    def __add__(self, other: Skipped) -> Skipped:
        return Skipped(self.count + other.count, self.first or other.first)

    def report(self, path: str | Path) -> None:
        if self.count:
            rows = "row" if self.count == 1 else "rows"
            print(f"{path}: skipped {self.count} bad {rows} (the first: {self.first})", flush=True)


def _build(path: str | Path, tokenizer: Tokenizer, skip_bad_rows: bool, columns: dict[str, Column], row_fn):
    """The token cache of ``path``: ``row_fn(record, where)`` gives each row's columns (raising BadRow)."""
    settings = {
        "task": "pairs" if "chosen" in columns else "unpaired",
        "chat_template": tokenizer.chat_template,
        "skip_bad_rows": skip_bad_rows,
    }

    def build(writer) -> dict:
        skipped = Skipped()
        for line, record in read_records(path):
            try:
                writer.append(**row_fn(record, place(path, line)), lines=line)
            except BadRow as exc:
                if not skip_bad_rows:
                    raise NibbleError(f"{exc}; fix the row, or pass --skip-bad-rows to leave such rows out") from None
                skipped.add(exc)
        if writer.rows == 0:
            raise NibbleError(f"{path}: holds no usable rows; add data or fix the path")
        return {"skipped": skipped.count, "first_skipped": skipped.first}

    bounds = dict.fromkeys((name for name, c in columns.items() if c.dtype == "uint32"), len(tokenizer))
    cache = cached_tokens(path, tokenizer.path, settings, columns, build, bounds)
    Skipped(cache.meta.get("skipped", 0), cache.meta.get("first_skipped")).report(path)
    return cache


@dataclass
class Truncation:
    """TRL's truncation: the prompt keeps its last ``max_prompt_len`` tokens, then a sequence its first
    ``max_seq_len``."""

    max_seq_len: int
    max_prompt_len: int | None = None

    def prompt_lengths(self, lengths: np.ndarray) -> np.ndarray:
        return lengths if self.max_prompt_len is None else np.minimum(lengths, self.max_prompt_len)

    def report(self, source: str | Path, prompt: Ragged, completions: Sequence[Ragged]) -> None:
        """Print the line saying what ``max_seq_len`` cuts from the rows of ``prompt`` (kept to ``max_prompt_len``)
        followed by each of ``completions`` (see :func:`nibble.data.batching.truncation_note`); nothing when
        nothing is cut."""
        lp = self.prompt_lengths(prompt.lengths())
        if not len(lp):
            return
        full = [lp + c.lengths() for c in completions]  # each row's sequences before the cut
        over = [np.maximum(f - self.max_seq_len, 0) for f in full]  # completion tokens past it (prompts fit)
        note = truncation_note(
            source,
            self.max_seq_len,
            rows=len(lp),
            cut=int(np.logical_or.reduce([o > 0 for o in over]).sum()),
            dropped=sum(int(o.sum()) for o in over),
            tokens=sum(int(c.lengths().sum()) for c in completions),
            longest=int(max(f.max() for f in full)),
            what="completion tokens",
        )
        if note is not None:
            print(f"tokens: {note}", flush=True)

    def sequence(self, prompt: np.ndarray, completion: np.ndarray) -> tuple[np.ndarray, int]:
        """The truncated sequence and its prompt's length in it."""
        if self.max_prompt_len is not None and len(prompt) > self.max_prompt_len:
            prompt = prompt[len(prompt) - self.max_prompt_len :]
        return np.concatenate([prompt, completion])[: self.max_seq_len], len(prompt)


def _kept(prompt: Ragged, truncation: Truncation, lines: np.ndarray, path: str | Path, skip: bool) -> np.ndarray:
    """The rows whose prompt leaves a completion token to predict within ``max_seq_len`` (each completion has at
    least one token; position 0 predicts nothing, so an empty prompt's first completion token is not a target)."""
    lp = truncation.prompt_lengths(prompt.lengths())
    bad = np.maximum(lp, 1) >= truncation.max_seq_len
    if bad.any() and not skip:
        raise NibbleError(
            f"{place(path, int(lines[np.flatnonzero(bad)[0]]))}: the prompt leaves no completion token within "
            f"max_seq_len {truncation.max_seq_len}; raise --max-seq-len, set --max-prompt-len, or pass --skip-bad-rows"
        )
    if bad.any():
        Skipped(int(bad.sum()), f"{place(path, int(lines[np.flatnonzero(bad)[0]]))}: prompt too long").report(path)
    return np.flatnonzero(~bad)


def _sequences_batch(seqs: list[np.ndarray], prompt_lens: list[int], pad_id: int, prefix: str = "") -> Batch:
    """A padded batch of ``seqs`` and where its completion tokens are predicted: ``target_index`` [N] (flat
    positions in [B, T - 1]: position t predicts token t + 1), ``targets`` [N], ``target_row`` [N] and
    ``completion_tokens`` [B], all computed on the host; every key after ``prefix``."""
    batch = pad_batch([s.tolist() for s in seqs], pad_id)
    width = batch["input_ids"].shape[1] - 1
    index, targets, rows, counts = [], [], [], []
    for row, (seq, lp) in enumerate(zip(seqs, prompt_lens, strict=True)):
        positions = np.arange(max(lp, 1) - 1, len(seq) - 1)
        index.append(row * width + positions)
        targets.append(seq[positions + 1])
        rows.append(np.full(len(positions), row))
        counts.append(len(positions))
    batch["target_index"] = torch.from_numpy(np.concatenate(index).astype(np.int64))
    batch["targets"] = torch.from_numpy(np.concatenate(targets).astype(np.int64))
    batch["target_row"] = torch.from_numpy(np.concatenate(rows).astype(np.int64))
    batch["completion_tokens"] = torch.tensor(counts, dtype=torch.long)
    return {prefix + key: value for key, value in batch.items()}


def sub_batch(batch: Batch, prefix: str) -> Batch:
    """The keys of ``batch`` that start with ``prefix``, without it (a second set of sequences in one batch)."""
    return {key[len(prefix) :]: value for key, value in batch.items() if key.startswith(prefix)}


@dataclass
class PairData:
    """Pairs of completions (prompt, chosen, rejected ids; the source line; the margin) under a :class:`Truncation`.

    A batch of B pairs holds 2B sequences, the chosen ones first (see :func:`_sequences_batch`), plus ``margin``
    [B], and ``ref_logps`` [2B] when the reference log-probabilities are precomputed (``reference``: [pairs, 2]).
    """

    prompt: Ragged
    chosen: Ragged
    rejected: Ragged
    margin: np.ndarray
    lines: np.ndarray
    truncation: Truncation
    reference: np.ndarray | None = None
    cache_dir: Path | None = None  # the token cache the ids come from (precomputed reference log-probs sit beside)

    def __len__(self) -> int:
        return len(self.lines)

    def lengths(self) -> np.ndarray:
        """Tokens of each pair's two sequences (int64 [N]): what a batch of pairs computes."""
        lp = self.truncation.prompt_lengths(self.prompt.lengths())
        cap = self.truncation.max_seq_len
        return np.minimum(lp + self.chosen.lengths(), cap) + np.minimum(lp + self.rejected.lengths(), cap)

    def subset(self, indices: Sequence[int] | np.ndarray) -> PairData:
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            prompt=self.prompt.subset(idx),
            chosen=self.chosen.subset(idx),
            rejected=self.rejected.subset(idx),
            margin=self.margin[idx],
            lines=self.lines[idx],
            reference=None if self.reference is None else self.reference[idx],
        )

    def with_reference(self, reference: np.ndarray) -> PairData:
        return replace(self, reference=reference)

    def collate(self, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        seqs, prompt_lens = [], []
        for side in (self.chosen, self.rejected):
            for i in indices:
                seq, lp = self.truncation.sequence(self.prompt[int(i)], side[int(i)])
                seqs.append(seq)
                prompt_lens.append(lp)
        batch = _sequences_batch(seqs, prompt_lens, pad_id)
        batch["margin"] = torch.from_numpy(np.asarray(self.margin[np.asarray(indices, dtype=np.int64)], np.float32))
        if self.reference is not None:
            ref = self.reference[np.asarray(indices, dtype=np.int64)]  # [B, 2]
            batch["ref_logps"] = torch.from_numpy(np.concatenate([ref[:, 0], ref[:, 1]]).astype(np.float32))
        return batch


@dataclass
class UnpairedData:
    """Single completions labelled desirable (1) or not (0), for KTO, under a :class:`Truncation`.

    A batch of B rows holds their B sequences, plus ``desirable`` [B] (bool), and under the prefix ``kl_`` the B
    mismatched sequences of the KL estimate: row i's prompt with the completion of row i - 1 of the data (a fixed
    pairing, as TRL's rotation of completions, so that its reference log-probs can be precomputed). Precomputed
    reference log-probs come as ``ref_logps`` [B] and ``kl_ref_logps`` [B] (``reference``: [rows, 2]).
    """

    prompt: Ragged
    completion: Ragged
    label: np.ndarray
    lines: np.ndarray
    truncation: Truncation
    reference: np.ndarray | None = None
    cache_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.lines)

    def lengths(self) -> np.ndarray:
        """Tokens of each row's sequence (int64 [N]); the mismatched KL sequence runs without gradients."""
        lp = self.truncation.prompt_lengths(self.prompt.lengths())
        return np.minimum(lp + self.completion.lengths(), self.truncation.max_seq_len)

    def subset(self, indices: Sequence[int] | np.ndarray) -> UnpairedData:
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            prompt=self.prompt.subset(idx),
            completion=self.completion.subset(idx),
            label=self.label[idx],
            lines=self.lines[idx],
            reference=None if self.reference is None else self.reference[idx],
        )

    def with_reference(self, reference: np.ndarray) -> UnpairedData:
        return replace(self, reference=reference)

    def collate(self, indices: Sequence[int], pad_id: int) -> Batch:
        rows = [int(i) for i in indices]
        parts = {"": [(i, i) for i in rows], "kl_": [(i, (i - 1) % len(self)) for i in rows]}
        batch: Batch = {}
        for prefix, pairs in parts.items():
            cut = [self.truncation.sequence(self.prompt[i], self.completion[j]) for i, j in pairs]
            batch.update(_sequences_batch([c[0] for c in cut], [c[1] for c in cut], pad_id, prefix))
        batch["desirable"] = torch.from_numpy(np.asarray(self.label[rows], dtype=bool))
        if self.reference is not None:
            ref = np.asarray(self.reference[rows], dtype=np.float32)  # [B, 2]
            batch["ref_logps"], batch["kl_ref_logps"] = (
                torch.from_numpy(ref[:, 0].copy()),
                torch.from_numpy(ref[:, 1].copy()),
            )
        return batch


def load_pairs(path: str | Path, tokenizer: Tokenizer, truncation: Truncation, skip_bad_rows: bool = False) -> PairData:
    """Read, tokenize (through the token cache) and check the pair rows of ``path`` (see the module docstring).

    Raises:
        NibbleError: a missing file, a file without rows, or a bad row (without ``skip_bad_rows``), naming the row.
    """
    encoder = _Encoder(tokenizer)

    def row(record: dict[str, Any], where: str) -> dict[str, Any]:
        prompt, chosen, rejected = pair_parts(record, where)
        prompt_ids, (chosen_ids, rejected_ids) = encoder.encode(prompt, [chosen, rejected], where)
        return {"prompt": prompt_ids, "chosen": chosen_ids, "rejected": rejected_ids, "margin": _margin(record, where)}

    cache = _build(path, tokenizer, skip_bad_rows, PAIR_COLUMNS, row)
    prompt, lines = cache.ragged("prompt"), cache.column("lines")
    chosen, rejected, margin = cache.ragged("chosen"), cache.ragged("rejected"), cache.column("margin")
    data = PairData(prompt, chosen, rejected, margin, lines, truncation, cache_dir=cache.directory)
    data = data.subset(_kept(prompt, truncation, lines, path, skip_bad_rows))
    truncation.report(path, data.prompt, [data.chosen, data.rejected])
    return data


def load_unpaired(
    path: str | Path, tokenizer: Tokenizer, truncation: Truncation, skip_bad_rows: bool = False
) -> UnpairedData:
    """Read, tokenize and check KTO's rows ``{"prompt", "completion", "label"}`` of ``path``.

    Raises:
        NibbleError: a missing file, a file without rows, or a bad row (without ``skip_bad_rows``), naming the row.
    """
    encoder = _Encoder(tokenizer)

    def row(record: dict[str, Any], where: str) -> dict[str, Any]:
        prompt = _field(record, "prompt", where)
        if not isinstance(prompt, str):
            prompt = parse_messages(prompt, "prompt", where)
        completion = _same_kind(prompt, _field(record, "completion", where), "completion", where)
        label = _label(record, where)
        prompt_ids, (completion_ids,) = encoder.encode(prompt, [completion], where)
        return {"prompt": prompt_ids, "completion": completion_ids, "label": int(label)}

    cache = _build(path, tokenizer, skip_bad_rows, UNPAIRED_COLUMNS, row)
    prompt, lines = cache.ragged("prompt"), cache.column("lines")
    data = UnpairedData(
        prompt, cache.ragged("completion"), cache.column("label"), lines, truncation, None, cache.directory
    )
    data = data.subset(_kept(prompt, truncation, lines, path, skip_bad_rows))
    truncation.report(path, data.prompt, [data.completion])
    return data
