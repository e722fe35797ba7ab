"""Instruction data: JSONL conversations -> chat-template token ids with the loss on response tokens only.

A row is ``{"instruction": ..., "response": ..., "system": ...?}`` or ``{"messages": [{"role", "content"}, ...]}``.
Each conversation is rendered with the tokenizer's chat template (ChatML when it has none) and tokenized
as transformers tokenizes a rendered chat (no extra special tokens). The tokens of every assistant turn,
its end-of-turn markup included, are the targets; everything else (system, user, the assistant's
opening) is masked with ``IGNORE_INDEX``. ``labels`` are aligned with ``ids`` (not shifted): the loss
at position t predicts ``labels[t + 1]``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate, chain
from pathlib import Path
from typing import Any

import torch

from nibble.data.batching import pad_batch, pad_sequences
from nibble.data.records import jsonl_records
from nibble.errors import NibbleError
from nibble.io.tokenizer import Tokenizer

IGNORE_INDEX = -100
# ChatML, for models without a template of their own; a turn ends with the tokenizer's EOS token when it has
# one, so a model tuned on it learns to emit the token that stops generation.
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "(eos_token or '<|im_end|>') + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def use_chat_template(tokenizer: Tokenizer) -> bool:
    """Give ``tokenizer`` the ChatML template when it has none; returns whether it did."""
    if tokenizer.chat_template is not None:
        return False
    tokenizer.chat_template = CHATML
    return True


@dataclass
class InstructData:
    """Tokenized examples: ``ids[i]`` and the aligned ``labels[i]`` (``IGNORE_INDEX`` where no loss)."""

    ids: list[list[int]]
    labels: list[list[int]]
    lines: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int]) -> InstructData:
        return InstructData(
            [self.ids[i] for i in indices],
            [self.labels[i] for i in indices],
            [self.lines[i] for i in indices] if self.lines else [],
        )

    def collate(self, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The padded batch of the examples at ``indices`` (see :func:`collate_lm`)."""
        return collate_lm([self.ids[i] for i in indices], [self.labels[i] for i in indices], pad_id)

    def target_tokens(self) -> int:
        """Tokens that carry a loss: each labelled token after the first position of its sequence."""
        return sum(sum(t != IGNORE_INDEX for t in labels[1:]) for labels in self.labels)


def conversation(record: dict[str, Any], source: str | Path, line: int) -> list[dict[str, str]]:
    """The messages of one row (instruction/response/system fields, or a ``messages`` list).

    Raises:
        NibbleError: neither form, a field that is not a string, or no assistant turn; names the line.
    """
    where = f"{source} line {line}"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise NibbleError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise NibbleError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise NibbleError(f"{where}: no message with role 'assistant'; there is nothing to learn from this row")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if "instruction" in record and "response" in record:
        for key in ("instruction", "response", "system"):
            if key in record and not isinstance(record[key], str):
                raise NibbleError(f"{where}: '{key}' must be a string, got {type(record[key]).__name__}")
        system = [{"role": "system", "content": record["system"]}] if record.get("system") else []
        return [
            *system,
            {"role": "user", "content": record["instruction"]},
            {"role": "assistant", "content": record["response"]},
        ]
    fields = ", ".join(map(str, record)) or "none"
    raise NibbleError(f"{where}: expected 'instruction' and 'response' fields or a 'messages' list (fields: {fields})")


def encode_conversation(
    tokenizer: Tokenizer, messages: list[dict[str, str]], where: str = "conversation"
) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and its labels (the ids of assistant turns, else IGNORE_INDEX).

    An assistant turn spans from the end of the conversation rendered up to it with the generation prompt,
    to the end of the conversation rendered through it. A token belongs to the turn when it starts inside.

    Raises:
        NibbleError: a template that renders earlier turns differently once later ones follow (the turn
            boundaries cannot be found then).
    """
    full = tokenizer.apply_chat_template(messages)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[: i + 1])
        if not (through.startswith(before) and full.startswith(through)):
            raise NibbleError(
                f"{where}: the chat template does not render this conversation turn by turn (a prefix changes when "
                "later turns follow), so the response tokens cannot be located; train on single-turn rows"
            )
        spans.append((len(before), len(through)))
    encoding = tokenizer.backend.encode(full, add_special_tokens=False)
    ids = list(encoding.ids)
    labels = [
        token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
        for token, (begin, _) in zip(ids, encoding.offsets, strict=True)
    ]
    return ids, labels


def pack(data: InstructData, max_seq_len: int) -> InstructData:
    """Concatenate the examples in order and cut the stream into sequences of ``max_seq_len`` tokens.

    Examples then share a sequence (and attend to the ones before them in it); each keeps its own labels.
    ``lines`` holds the source line of each sequence's first token.
    """
    flat_ids = list(chain.from_iterable(data.ids))
    flat_labels = list(chain.from_iterable(data.labels))
    starts = list(accumulate((len(x) for x in data.ids[:-1]), initial=0))  # offset of each example
    chunks = range(0, len(flat_ids), max_seq_len)
    return InstructData(
        [flat_ids[c : c + max_seq_len] for c in chunks],
        [flat_labels[c : c + max_seq_len] for c in chunks],
        [data.lines[bisect_right(starts, c) - 1] for c in chunks] if data.lines else [],
    )


def read_instruct(path: str | Path, tokenizer: Tokenizer) -> InstructData:
    """Read, render and tokenize an instruction file (see the module docstring), at full length.

    Raises:
        NibbleError: a missing or unreadable file, or a bad row; the message names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise NibbleError(f"{path}: no such data file; check the path")
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise NibbleError(f"{path}: instruction data must be JSON Lines (.jsonl), one conversation per line")
    data = InstructData([], [], [])
    for line, record in jsonl_records(path):
        ids, labels = encode_conversation(tokenizer, conversation(record, path, line), f"{path} line {line}")
        data.ids.append(ids)
        data.labels.append(labels)
        data.lines.append(line)
    if not data.ids:
        raise NibbleError(f"{path}: holds no rows; add data or fix the path")
    return data


def fit_length(data: InstructData, max_seq_len: int, packing: bool, source: str | Path) -> InstructData:
    """Sequences of at most ``max_seq_len`` tokens: packed (see :func:`pack`), or each example cut to length.

    Raises:
        NibbleError: (without packing) an example with no response token left within ``max_seq_len``.
    """
    if packing:
        return pack(data, max_seq_len)
    cut = InstructData([ids[:max_seq_len] for ids in data.ids], [lab[:max_seq_len] for lab in data.labels], data.lines)
    for labels, line in zip(cut.labels, cut.lines, strict=True):
        if all(t == IGNORE_INDEX for t in labels[1:]):
            raise NibbleError(
                f"{source} line {line}: no response token within max_seq_len {max_seq_len}; raise --max-seq-len, "
                "shorten the prompt, or use --packing"
            )
    return cut


def load_instruct(
    path: str | Path, tokenizer: Tokenizer, *, max_seq_len: int = 512, packing: bool = False
) -> InstructData:
    """:func:`read_instruct` then :func:`fit_length`."""
    return fit_length(read_instruct(path, tokenizer), max_seq_len, packing, path)


def collate_lm(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A padded batch (see :func:`nibble.data.batching.pad_batch`) plus ``labels`` [B, T] padded with IGNORE_INDEX."""
    return {**pad_batch(ids, pad_id), "labels": pad_sequences(labels, IGNORE_INDEX)}
