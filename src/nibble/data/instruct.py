"""Instruction data: conversations -> chat-template token ids with the loss on response tokens only.

A row is one of these schemas (checked in this order):

- ``{"messages": [{"role", "content", ...}, ...], "tools"?}`` (OpenAI/TRL chat: system, user, assistant and tool
  messages, assistant reasoning and tool calls, the row's tool schemas; see :mod:`nibble.data.chat`);
- ``{"conversations": [{"from", "value"}, ...]}`` (ShareGPT; ``human`` -> user, ``gpt`` -> assistant);
- ``{"instruction", "output", "input"?}`` (Alpaca; a non-empty input follows the instruction after a blank line);
- ``{"instruction", "response"}``;
- ``{"prompt", "completion"}`` (strings, or TRL's conversational lists of messages);

each with an optional ``system`` string; or any columns named by a mapping (:func:`parse_columns`).
Each conversation is rendered with the tokenizer's chat template (ChatML when it has none) and tokenized
as transformers tokenizes a rendered chat (no extra special tokens). The tokens of every assistant turn
(reasoning, answer, tool calls, its end-of-turn markup) are the targets, found by rendering (see
:mod:`nibble.data.chat`, which also turns a conversation whose template rewrites history into several rows);
everything else (system, user, tool results, the assistant's opening) is masked. ``labels`` are aligned
with ``ids`` (not shifted): the loss at position t predicts ``labels[t + 1]``; a masked position holds
``IGNORE_INDEX``.

Conversations are rendered and tokenized once, as a stream, into a token cache on disk (ids and a response
mask per conversation, full length; see :mod:`nibble.data.tokens`); truncation and packing are views over it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nibble.data.batching import MAX_SEQ_LEN, pad_batch, pad_sequences, truncation_note
from nibble.data.chat import (
    DEFAULT_RENDERING,
    RenderOptions,
    chat_rows,
    history_mismatch,
    marked_text,
    parse_messages,
    resolve_thinking,
    row_tools,
)
from nibble.data.ragged import Packed, Ragged
from nibble.data.records import place, read_records
from nibble.data.tokens import Column, cached_tokens
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
BUILTIN_TEMPLATES = {"chatml": CHATML}
# The roles a column mapping may name: the parts of a single-turn row, or a whole list of messages.
ROLES = ("prompt", "response", "system", "input", "messages")
NO_TARGET = int(np.iinfo(np.int32).max)  # first_target of a sequence without a target after position 0
CACHE_COLUMNS = {
    "ids": Column("uint32"),
    "mask": Column("uint8"),
    "lines": Column("int64", ragged=False),
    "first_target": Column("int32", ragged=False),
}
_SCHEMAS = (
    "'messages', 'conversations' (ShareGPT), 'instruction'+'output' (Alpaca), 'instruction'+'response' or "
    "'prompt'+'completion'"
)


def use_chat_template(tokenizer: Tokenizer) -> bool:
    """Give ``tokenizer`` the ChatML template when it has none; returns whether it did."""
    if tokenizer.chat_template is not None:
        return False
    tokenizer.chat_template = CHATML
    return True


def resolve_chat_template(spec: str) -> str:
    """The template a ``--chat-template`` value names: a built-in name (see ``BUILTIN_TEMPLATES``) or a file.

    Raises:
        NibbleError: neither a built-in name nor a readable UTF-8 file.
    """
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec)
    if not path.is_file():
        names = ", ".join(BUILTIN_TEMPLATES)
        raise NibbleError(f"--chat-template {spec}: no such file and not a built-in template ({names})")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NibbleError(f"{path}: cannot read the chat template ({exc}); save it as UTF-8 text") from None


def default_system_prompt(tokenizer: Tokenizer) -> str | None:
    """The system message the chat template adds to a conversation that has none, or None.

    A short conversation is rendered twice, with a marker system message and without one; when the second
    rendering holds a block where the first holds the marker, that block's content is returned.
    """
    probe_system, probe_user = "nibble-probe-system-7f3a", "nibble-probe-user-7f3a"
    turns = [{"role": "user", "content": probe_user}, {"role": "assistant", "content": "ok"}]
    try:
        with_system = tokenizer.apply_chat_template([{"role": "system", "content": probe_system}, *turns])
        without = tokenizer.apply_chat_template(turns)
    except NibbleError:  # e.g. a template that refuses system messages
        return None
    if probe_system not in with_system:
        return None
    before, after = with_system.split(probe_system, 1)
    between = after[: after.index(probe_user)] if probe_user in after else None
    if between is None or not without.startswith(before) or probe_user not in without:
        return None
    rest = without[len(before) :]
    end = rest.find(between + probe_user)
    injected = rest[:end].strip() if end > 0 else ""
    return injected or None


def set_chat_template(tokenizer: Tokenizer, override: str | None, model_dir: Path) -> str | None:
    """Give ``tokenizer`` the template ``override`` names (a file or a built-in name), or ChatML when it has
    none, and say so; also say when the template adds a default system message to conversations without one.
    Returns the template to save with the adapter (None: the tokenizer's own, which its files carry).
    """
    saved = None
    if override is not None:
        saved = tokenizer.chat_template = resolve_chat_template(override)
        print(f"chat template: {override} (instead of the model's)", flush=True)
    elif use_chat_template(tokenizer):
        saved = CHATML
        print(f"{model_dir}: the tokenizer has no chat template; rendering conversations as ChatML", flush=True)
    system = default_system_prompt(tokenizer)
    if system is not None:
        shown = system if len(system) <= 80 else system[:77] + "..."
        print(
            f"chat template: conversations without a system message get the template's default one ({shown!r}); "
            "give rows a system message or pass --chat-template to change it",
            flush=True,
        )
    return saved


def parse_columns(spec: str | None) -> dict[str, str]:
    """A column mapping ``"prompt=question,response=answer"`` as ``{role: column}`` (see ``ROLES``).

    Raises:
        NibbleError: a malformed entry, an unknown or repeated role, or a mapping that names neither
            ``messages`` nor both ``prompt`` and ``response``.
    """
    if not spec:
        return {}
    mapping: dict[str, str] = {}
    for entry in spec.split(","):
        role, sep, column = (part.strip() for part in entry.partition("="))
        if not sep or not role or not column:
            raise NibbleError(f"columns: '{entry.strip()}' is not ROLE=COLUMN; e.g. prompt=question,response=answer")
        if role not in ROLES:
            raise NibbleError(f"columns: unknown role '{role}'; roles are {', '.join(ROLES)}")
        if role in mapping:
            raise NibbleError(f"columns: role '{role}' is mapped twice")
        mapping[role] = column
    if "messages" in mapping and len(mapping) > 1:
        raise NibbleError("columns: 'messages' names the whole conversation; map no other role with it")
    if "messages" not in mapping and not {"prompt", "response"} <= set(mapping):
        raise NibbleError(
            "columns: map both 'prompt' and 'response' (or 'messages'), e.g. prompt=question,response=answer"
        )
    return mapping


def _text(record: dict[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise NibbleError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def conversation(
    record: dict[str, Any], source: str | Path, line: int, columns: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The messages of one row (see the module docstring for the schemas), through ``columns`` when given.

    Raises:
        NibbleError: no schema matches (naming the row's fields), a mapped column is missing, a field of the
            wrong type, or no assistant turn; names the line.
    """
    where = place(source, line)
    record = {k: v for k, v in record.items() if v is not None}  # a null cell (Parquet, datasets) is no field
    fields = ", ".join(map(str, record)) or "none"
    if columns:
        missing = [c for c in columns.values() if c not in record]
        if missing:
            raise NibbleError(f"{where}: no column '{missing[0]}' (fields: {fields}); fix --columns")
        if "messages" in columns:
            messages = parse_messages(record[columns["messages"]], columns["messages"], where)
        else:
            parts = {role: _text(record, column, where) for role, column in columns.items()}
            messages = _single_turn(parts.get("system"), parts["prompt"], parts.get("input"), parts["response"])
    elif "messages" in record:
        messages = parse_messages(record["messages"], "messages", where)
    elif "conversations" in record:
        messages = parse_messages(record["conversations"], "conversations", where)
    elif "prompt" in record and "completion" in record and isinstance(record["prompt"], list):
        if not isinstance(record["completion"], list) or not record["completion"]:
            raise NibbleError(f"{where}: 'completion' must be a non-empty list of messages like the prompt")
        messages = parse_messages(record["prompt"] + record["completion"], "prompt + completion", where)
    else:
        for prompt, response in (("instruction", "output"), ("instruction", "response"), ("prompt", "completion")):
            if prompt in record and response in record:
                present = [k for k in ("system", "input") if k in record and (k == "system" or prompt == "instruction")]
                parts = {k: _text(record, k, where) for k in (prompt, response, *present)}
                messages = _single_turn(parts.get("system"), parts[prompt], parts.get("input"), parts[response])
                break
        else:
            raise NibbleError(
                f"{where}: no instruction schema matches the fields ({fields}); expected {_SCHEMAS}, "
                "or map the columns with --columns prompt=COL,response=COL"
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise NibbleError(f"{where}: no message with role 'assistant'; there is nothing to learn from this row")
    return messages


def _is_chat(record: dict[str, Any], columns: dict[str, str]) -> bool:
    """Whether the row is a list of messages (the schemas whose ``tools`` field reaches the template)."""
    if columns:
        return "messages" in columns
    return "messages" in record or "conversations" in record or isinstance(record.get("prompt"), list)


def _single_turn(system: str | None, prompt: str, extra: str | None, response: str) -> list[dict[str, str]]:
    user = f"{prompt}\n\n{extra}" if extra else prompt
    return [
        *([{"role": "system", "content": system}] if system else []),
        {"role": "user", "content": user},
        {"role": "assistant", "content": response},
    ]


@dataclass
class InstructData:
    """Token sequences ``ids`` and the aligned response ``mask`` (1 where the token is a target), the source
    line of each sequence (its first token's, when packed), and, before packing, the position of each
    sequence's first target after position 0 (``NO_TARGET`` when none) for length checks."""

    ids: Ragged | Packed
    mask: Ragged | Packed
    lines: np.ndarray
    first_target: np.ndarray | None = None

    @classmethod
    def from_lists(
        cls, ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], lines: Sequence[int] | None = None
    ) -> InstructData:
        """Sequences held in memory: ``labels[i]`` is ``ids[i]`` with ``IGNORE_INDEX`` where there is no loss."""
        masks = [[int(t != IGNORE_INDEX) for t in row] for row in labels]
        return cls(
            Ragged.from_lists(ids),
            Ragged.from_lists(masks, np.uint8),
            np.asarray(lines if lines is not None else range(1, len(ids) + 1), dtype=np.int64),
            np.array([first_target(m) for m in masks], dtype=np.int64),
        )

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> np.ndarray:
        """Tokens of each example (int64 [N])."""
        return self.ids.lengths()

    def labels(self, i: int) -> np.ndarray:
        """The labels of sequence ``i``: its ids where the mask is set, else ``IGNORE_INDEX``."""
        return np.where(self.mask[i] != 0, self.ids[i], IGNORE_INDEX)

    def subset(self, indices: Sequence[int] | np.ndarray) -> InstructData:
        if not isinstance(self.ids, Ragged) or not isinstance(self.mask, Ragged) or self.first_target is None:
            raise NibbleError("packed instruction data cannot be subset; split before packing")
        indices = np.asarray(indices, dtype=np.int64)
        return InstructData(
            self.ids.subset(indices), self.mask.subset(indices), self.lines[indices], self.first_target[indices]
        )

    def collate(self, indices: Sequence[int], pad_id: int) -> dict[str, torch.Tensor]:
        """The padded batch of the examples at ``indices`` (see :func:`collate_lm`)."""
        return collate_lm([self.ids[i] for i in indices], [self.labels(i) for i in indices], pad_id)

    def target_tokens(self) -> int:
        """Tokens that carry a loss: each labelled token after the first position of its sequence."""
        return self.mask.total(skip_first=True)


def first_target(mask: Sequence[int] | np.ndarray) -> int:
    """The first position >= 1 whose mask is set, or ``NO_TARGET``."""
    rest = np.asarray(mask[1:])
    first = int(np.argmax(rest)) if len(rest) else 0  # (the first set position, without an index per token)
    return first + 1 if len(rest) and rest[first] else NO_TARGET


def encode_conversation(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    where: str = "conversation",
    tools: list[dict[str, Any]] | None = None,
    options: RenderOptions = DEFAULT_RENDERING,
) -> tuple[list[int], list[int]]:
    """Token ids of a conversation that renders as one training row and its labels (the ids of assistant
    turns, else IGNORE_INDEX); see :func:`nibble.data.chat.chat_rows` for conversations that become several.

    Raises:
        NibbleError: the conversation becomes several rows (its template rewrites earlier turns).
    """
    rows = chat_rows(tokenizer, messages, where, tools, options)
    if len(rows) != 1:
        raise NibbleError(f"{where}: the chat template rewrites earlier turns; this conversation is {len(rows)} rows")
    ids, mask = rows[0].ids, rows[0].mask
    return ids.tolist(), np.where(mask == 1, ids.astype(np.int64), IGNORE_INDEX).tolist()


def pack(data: InstructData, max_seq_len: int) -> InstructData:
    """Concatenate the examples in order and cut the stream into sequences of ``max_seq_len`` tokens.

    Examples then share a sequence (and attend to the ones before them in it); each keeps its own labels.
    ``lines`` holds the source line of each sequence's first token.
    """
    if not isinstance(data.ids, Ragged) or not isinstance(data.mask, Ragged):
        raise NibbleError("instruction data is packed already")
    ids = Packed(data.ids, max_seq_len)
    return InstructData(ids, Packed(data.mask, max_seq_len), data.lines[ids.first_rows()])


def read_instruct(
    path: str | Path, tokenizer: Tokenizer, columns: str | None = None, options: RenderOptions = DEFAULT_RENDERING
) -> InstructData:
    """Read, render and tokenize an instruction file (see the module docstring) at full length, through its
    token cache (keyed by the template and the rendering ``options``); ``columns`` maps other column names (see
    :func:`parse_columns`). When conversations become more rows than there are (a template that rewrites
    history), one line says how many.

    Raises:
        NibbleError: a missing or unreadable file, or a bad row; the message names the file and line.
    """
    mapping = parse_columns(columns)
    options.check()
    thinking = resolve_thinking(tokenizer, options.thinking)
    settings = {
        "task": "instruct",
        "chat_template": tokenizer.chat_template,
        "columns": mapping,
        "thinking": thinking,
        "train_turns": options.train_turns,
    }
    resolved = RenderOptions(thinking, options.train_turns)

    def build(writer) -> dict:
        conversations = 0
        for line, record in read_records(path):
            where = place(path, line)
            messages = conversation(record, path, line, mapping)
            tools = row_tools(record, where) if _is_chat(record, mapping) else None
            for row in chat_rows(tokenizer, messages, where, tools, resolved):
                writer.append(ids=row.ids, mask=row.mask, lines=line, first_target=first_target(row.mask))
            conversations += 1
        if writer.rows == 0:
            raise NibbleError(f"{path}: holds no rows; add data or fix the path")
        return {"conversations": conversations}

    bounds = {"ids": len(tokenizer), "mask": 2}
    cache = cached_tokens(path, tokenizer.path, settings, CACHE_COLUMNS, build, bounds)
    conversations = cache.meta.get("conversations", cache.rows)
    if cache.rows != conversations:
        print(
            f"{Path(path).name}: {conversations:,} conversations became {cache.rows:,} training rows: the chat "
            "template renders earlier turns differently once later ones follow (it drops their reasoning), so those "
            "turns are trained in the context inference gives them (--train-turns last: the final turn only)",
            flush=True,
        )
    return InstructData(cache.ragged("ids"), cache.ragged("mask"), cache.column("lines"), cache.column("first_target"))


def show_conversations(
    path: str | Path,
    tokenizer: Tokenizer,
    rows: int,
    columns: str | None = None,
    options: RenderOptions = DEFAULT_RENDERING,
    colour: bool = False,
) -> Iterator[str]:
    """Lines showing how the first ``rows`` conversations of ``path`` train (see :func:`read_instruct`): for each,
    its training rows with token and target counts and the text with its targets marked (see
    :func:`nibble.data.chat.marked_text`), and where the template rewrites history when it does.

    Raises:
        NibbleError: a missing or unreadable file, or a bad row; names the file and line.
    """
    mapping = parse_columns(columns)
    options.check()
    options = RenderOptions(resolve_thinking(tokenizer, options.thinking), options.train_turns)
    yield f"thinking: {options.thinking}, train turns: {options.train_turns}"
    for shown, (line, record) in enumerate(read_records(path)):
        if shown == rows:
            break
        where = place(path, line)
        messages = conversation(record, path, line, mapping)
        tools = row_tools(record, where) if _is_chat(record, mapping) else None
        found = chat_rows(tokenizer, messages, where, tools, options)
        mismatch = history_mismatch(tokenizer, messages, tools, options) if len(found) > 1 else None
        yield f"{where}: {len(found)} training row{'s' if len(found) > 1 else ''}" + (
            f" (the template rewrites history: {mismatch})" if mismatch else ""
        )
        for i, row in enumerate(found, 1):
            yield f"-- row {i}: {len(row.ids)} tokens, {int(row.mask.sum())} trained"
            yield marked_text(tokenizer, row, colour)


def fit_length(data: InstructData, max_seq_len: int, packing: bool, source: str | Path) -> InstructData:
    """Sequences of at most ``max_seq_len`` tokens: packed (see :func:`pack`), or each example cut to length (with
    one printed line saying how many were cut and how many response tokens that drops, see
    :func:`nibble.data.batching.truncation_note`).

    Raises:
        NibbleError: (without packing) an example with no response token within ``max_seq_len``.
    """
    if packing:
        return pack(data, max_seq_len)
    if not isinstance(data.ids, Ragged) or not isinstance(data.mask, Ragged) or data.first_target is None:
        raise NibbleError("instruction data is packed already")
    too_long = np.flatnonzero(np.asarray(data.first_target) >= max_seq_len)
    if len(too_long):
        raise NibbleError(
            f"{place(source, int(data.lines[too_long[0]]))}: no response token within max_seq_len {max_seq_len}; "
            "raise --max-seq-len, shorten the prompt, or use --packing"
        )
    cut = InstructData(data.ids.cut(max_seq_len), data.mask.cut(max_seq_len), data.lines, data.first_target)
    lengths = data.ids.lengths()
    if len(lengths) and int(lengths.max()) > max_seq_len:
        targets = data.target_tokens()
        note = truncation_note(
            source,
            max_seq_len,
            rows=len(lengths),
            cut=int((lengths > max_seq_len).sum()),
            dropped=targets - cut.target_tokens(),
            tokens=targets,
            longest=int(lengths.max()),
            what="response tokens",
        )
        print(f"tokens: {note}", flush=True)
    return cut


def load_instruct(
    path: str | Path,
    tokenizer: Tokenizer,
    *,
    max_seq_len: int = MAX_SEQ_LEN,
    packing: bool = False,
    columns: str | None = None,
    options: RenderOptions = DEFAULT_RENDERING,
) -> InstructData:
    """:func:`read_instruct` then :func:`fit_length`."""
    return fit_length(read_instruct(path, tokenizer, columns, options), max_seq_len, packing, path)


def collate_lm(ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """A padded batch (see :func:`nibble.data.batching.pad_batch`) plus ``labels`` [B, T] padded with IGNORE_INDEX
    and where the loss is: ``target_index`` [N] (flat positions in [B, T - 1]: position t predicts token t + 1) and
    ``targets`` [N] (those tokens), found on the host so that no step selects them on the device."""
    batch = pad_batch(ids, pad_id)
    width = batch["input_ids"].shape[1] - 1
    index, targets = [], []
    for row, seq in enumerate(labels):
        following = np.asarray(seq, dtype=np.int64)[1:]
        positions = np.flatnonzero(following != IGNORE_INDEX)
        index.append(row * width + positions)
        targets.append(following[positions])
    batch["labels"] = pad_sequences(labels, IGNORE_INDEX)
    batch["target_index"] = torch.from_numpy(np.concatenate(index).astype(np.int64))
    batch["targets"] = torch.from_numpy(np.concatenate(targets).astype(np.int64))
    return batch
