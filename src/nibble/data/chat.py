"""Chat rendering: conversations as users hold them (roles, reasoning, tool calls, a row's tools) and the
token masks of their assistant turns, found by rendering the conversation through the model's own template.

Messages: ``role`` is ``system``, ``user``, ``assistant`` or ``tool``, ``content`` a string (an assistant
message that calls tools may leave it out). An assistant message may carry ``reasoning_content`` (or a
``<think>...</think>`` block at the start of its content, split off as Qwen's template splits it) and
``tool_calls`` (``{"name", "arguments"}`` or OpenAI's ``{"type": "function", "function": {...}}``; arguments a
JSON object or a string holding one, passed to the template as an object). A row's ``tools`` (a list of JSON
schemas, or a string holding one) reach the template as ``tools``.

Masks: assistant turn ``i`` is the text between the conversation rendered up to it with the generation prompt
and the conversation rendered through it; a token is a target when it starts inside (so the reasoning, the
answer, the tool-call text and the end-of-turn markup are targets, and nothing else). With a template that
marks ``{% generation %}`` blocks, the targets are the tokens of the blocks within the turn, exactly as
transformers' ``return_assistant_tokens_mask`` chooses them. A template that renders a turn differently once
later turns follow (Qwen3's drops the reasoning of turns before the last user message) is detected: the
conversation becomes one row per context inference gives such a turn (the turn trained there, earlier ones
rendered as the template renders history), or, with ``train_turns="last"``, only its final turn is trained.

Thinking (``keep``, ``empty``, ``drop``) -- for an answer without reasoning the difference is where the empty
think block ``<think>\\n\\n</think>\\n\\n`` goes:

- ``keep``: reasoning is trained; an answer without any is trained as the answer to a thinking-off prompt
  (the template's ``enable_thinking=False`` generation prompt, empty block included, is context).
- ``empty``: reasoning is trained; an answer without any is trained with its empty think block (the model
  learns to skip thinking itself: Qwen3's recipe for non-thinking samples).
- ``drop``: reasoning is removed; every answer is trained as under ``keep``.

The default is ``empty`` for templates that render reasoning (Qwen3's) and ``keep`` for others; for those,
nibble writes the think blocks into the content itself.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from nibble.errors import NibbleError
from nibble.io.chat_template import has_generation_blocks
from nibble.io.tokenizer import Tokenizer

MESSAGE_ROLES = ("system", "user", "assistant", "tool")
THINKING = ("keep", "empty", "drop")
TRAIN_TURNS = ("all", "last")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
EMPTY_THINK = "<think>\n\n</think>\n\n"
_PROBE = "nibble-probe-reasoning-5c1e"


@dataclass(frozen=True)
class RenderOptions:
    """How conversations become training rows: ``thinking`` (see the module docstring; None: the template's
    default) and ``train_turns`` (``all``, or ``last``: only each conversation's final assistant turn)."""

    thinking: str | None = None
    train_turns: str = "all"

    def check(self) -> None:
        """Raises NibbleError for a value outside ``THINKING`` or ``TRAIN_TURNS``."""
        if self.thinking is not None and self.thinking not in THINKING:
            raise NibbleError(f"thinking: {self.thinking!r} is not one of {', '.join(THINKING)}")
        if self.train_turns not in TRAIN_TURNS:
            raise NibbleError(f"train_turns: {self.train_turns!r} is not one of {', '.join(TRAIN_TURNS)}")


DEFAULT_RENDERING = RenderOptions()


def _reasoning_in_content(content: str) -> tuple[str | None, str]:
    """A ``<think>`` block (or an unopened ``...</think>``) at the start of ``content``, split as Qwen's
    template splits it: (reasoning, answer), or (None, content) when there is none."""
    if "</think>" not in content:
        return None, content
    head, _, tail = content.partition("</think>")
    opened = head.lstrip().startswith("<think>")
    if not opened and "<think>" in head:
        return None, content
    return head.split("<think>", 1)[-1].strip("\n"), tail.lstrip("\n")


def _tool_call(call: Any, i: int, j: int, where: str) -> dict[str, Any]:
    function = call.get("function", call) if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise NibbleError(f"{where}: message {i} tool call {j} needs a string 'name' and 'arguments'")
    arguments = function.get("arguments")
    arguments = {} if arguments is None else arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (json.JSONDecodeError, RecursionError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise NibbleError(
                f"{where}: message {i} tool call {j} ({name}): 'arguments' is not JSON ({why}); give an object"
            ) from None
    if not isinstance(arguments, dict):
        raise NibbleError(
            f"{where}: message {i} tool call {j} ({name}): 'arguments' must be a JSON object, "
            f"got {type(arguments).__name__}"
        )
    out: dict[str, Any] = {"type": "function", "function": {"name": name, "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def parse_messages(value: Any, key: str, where: str) -> list[dict[str, Any]]:
    """The messages of ``value`` (``{"role", "content", ...}`` objects or ShareGPT's ``{"from", "value"}``
    turns) as the template expects them (see the module docstring).

    Raises:
        NibbleError: not a list of such objects, an unknown role, reasoning or tool calls on a message that is
            not the assistant's, a tool result before any tool call, or a malformed call; names ``where``.
    """
    if not isinstance(value, list) or not value:
        raise NibbleError(f"{where}: '{key}' must be a non-empty list of {{'role', 'content'}} objects")
    out: list[dict[str, Any]] = []
    called = False
    for i, m in enumerate(value):
        if isinstance(m, dict) and "from" in m and "role" not in m:
            role = SHAREGPT_ROLES.get(m["from"]) if isinstance(m["from"], str) else None
            if role is None:
                known = ", ".join(SHAREGPT_ROLES)
                raise NibbleError(f"{where}: message {i} is from {m['from']!r}; ShareGPT turns are from {known}")
            m = {"role": role, "content": m.get("value")}
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise NibbleError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        role, content = m["role"], m.get("content")
        reasoning, calls = m.get("reasoning_content"), m.get("tool_calls")
        if role not in MESSAGE_ROLES:
            raise NibbleError(f"{where}: message {i} has role {role!r}; roles are {', '.join(MESSAGE_ROLES)}")
        if role != "assistant" and (reasoning or calls):
            field = "reasoning_content" if reasoning else "tool_calls"
            raise NibbleError(f"{where}: message {i} ({role}) has '{field}'; only assistant messages carry it")
        if role == "assistant" and content is None and calls:
            content = ""
        if not isinstance(content, str):
            raise NibbleError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "assistant":
            inline, answer = _reasoning_in_content(content)
            if reasoning is not None and not isinstance(reasoning, str):
                raise NibbleError(f"{where}: message {i}: 'reasoning_content' must be a string")
            if reasoning is not None and inline is not None:
                raise NibbleError(
                    f"{where}: message {i} has both 'reasoning_content' and a <think> block in its content; keep one"
                )
            if inline is not None:
                reasoning, message["content"] = inline, answer
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            if calls is not None:
                if not isinstance(calls, list):
                    raise NibbleError(f"{where}: message {i}: 'tool_calls' must be a list of calls")
                message["tool_calls"] = [_tool_call(c, i, j, where) for j, c in enumerate(calls)]
                called = called or bool(calls)
        elif role == "tool":
            if not called:
                raise NibbleError(
                    f"{where}: message {i} is a tool result but no assistant message before it calls a tool; "
                    "add the call (tool_calls) or drop the result"
                )
            message.update({k: m[k] for k in ("tool_call_id", "name") if isinstance(m.get(k), str)})
        out.append(message)
    return out


def row_tools(record: dict[str, Any], where: str) -> list[dict[str, Any]] | None:
    """The row's ``tools`` (a list of JSON schemas, or a string holding one), or None.

    Raises:
        NibbleError: anything else; names ``where``.
    """
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except (json.JSONDecodeError, RecursionError) as exc:
            why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise NibbleError(f"{where}: 'tools' is a string but not JSON ({why}); give a list of schemas") from None
    if tools is None or (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        return tools or None
    raise NibbleError(f"{where}: 'tools' must be a list of JSON schema objects")


@functools.lru_cache(maxsize=16)
def _renders_reasoning(tokenizer: Tokenizer, template: str) -> bool:
    """Whether the template writes an assistant message's ``reasoning_content`` (a probe conversation)."""
    probe = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "a", "reasoning_content": _PROBE},
    ]
    try:
        return _PROBE in tokenizer.apply_chat_template(probe)
    except NibbleError:
        return False


def resolve_thinking(tokenizer: Tokenizer, thinking: str | None) -> str:
    """``thinking``, or the default for the tokenizer's template (``empty`` where it renders reasoning, as
    Qwen3's does, else ``keep``)."""
    if thinking is not None:
        return thinking
    return "empty" if _renders_reasoning(tokenizer, tokenizer.chat_template or "") else "keep"


def _think_block(reasoning: str) -> str:
    return f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"


def apply_thinking(tokenizer: Tokenizer, messages: list[dict[str, Any]], thinking: str) -> list[dict[str, Any]]:
    """The messages as rendered under ``thinking``: reasoning removed (``drop``), or, for a template that
    does not render reasoning, written into the content as a think block (an empty one for answers without
    reasoning under ``empty``)."""
    if thinking == "drop":
        return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]
    if _renders_reasoning(tokenizer, tokenizer.chat_template or ""):
        return messages
    out = []
    for m in messages:
        reasoning = m.get("reasoning_content")
        if m["role"] == "assistant" and (reasoning is not None or thinking == "empty"):
            block = _think_block(reasoning) if reasoning else EMPTY_THINK
            m = {k: v for k, v in m.items() if k != "reasoning_content"}
            m["content"] = block + m["content"].lstrip("\n")
        out.append(m)
    return out


@dataclass
class ChatRow:
    """One training row of a conversation: token ids (uint32) and the target mask (uint8)."""

    ids: np.ndarray
    mask: np.ndarray


def _turn_span(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    i: int,
    off_prompt: bool,
    variables: dict[str, Any],
    where: str,
) -> tuple[str, list[tuple[int, int]], int, int]:
    """Turn ``i`` rendered as the last message (``through``), the ``{% generation %}`` spans of that text, and
    the turn's span in it."""
    blocks: list[tuple[int, int]] = []
    through = tokenizer.apply_chat_template(messages[: i + 1], generation_spans=blocks, **variables)
    before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, **variables)
    if off_prompt:  # the thinking-off prompt, empty think block included, is context
        off = tokenizer.apply_chat_template(messages[:i], True, enable_thinking=False, **variables)
        before = off if through.startswith(off) else before
    if not through.startswith(before):
        raise NibbleError(
            f"{where}: the chat template's generation prompt does not begin assistant message {i} as the template "
            "renders it, so the response tokens cannot be located; fix the template or pass --chat-template"
        )
    return through, blocks, len(before), len(through)


def chat_rows(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    where: str = "conversation",
    tools: list[dict[str, Any]] | None = None,
    options: RenderOptions = DEFAULT_RENDERING,
) -> list[ChatRow]:
    """The training rows of one conversation (see the module docstring): one in general; one per context a
    turn needs when the template rewrites history. Memory follows the tokens.

    Raises:
        NibbleError: a template whose generation prompt does not begin the assistant turn it renders.
    """
    thinking = resolve_thinking(tokenizer, options.thinking)
    aware = _renders_reasoning(tokenizer, tokenizer.chat_template or "")
    rendered = apply_thinking(tokenizer, messages, thinking)
    variables = {"tools": tools} if tools else {}
    turns = [i for i, m in enumerate(rendered) if m["role"] == "assistant"]
    if options.train_turns == "last":
        turns = turns[-1:]
    full_blocks: list[tuple[int, int]] = []
    rows = [(tokenizer.apply_chat_template(rendered, generation_spans=full_blocks, **variables), full_blocks, [])]
    for i in reversed(turns):
        off_prompt = aware and thinking != "empty" and not rendered[i].get("reasoning_content")
        through, blocks, start, end = _turn_span(tokenizer, rendered, i, off_prompt, variables, where)
        row = next((row for row in rows if row[0].startswith(through)), None)
        if row is None:
            row = (through, blocks, [])
            rows.append(row)
        row[2].append((start, end))
    marked = has_generation_blocks(tokenizer.chat_template or "")
    rows.reverse()  # in the order of their first trained turn; a conversation's text without a trained turn is no row
    return [_tokenized(tokenizer, text, spans, blocks if marked else None) for text, blocks, spans in rows if spans]


def _tokenized(
    tokenizer: Tokenizer, text: str, turns: list[tuple[int, int]], blocks: list[tuple[int, int]] | None
) -> ChatRow:
    """``text`` tokenized, with the targets of the trained ``turns``: the tokens that start inside one, or,
    given the template's ``{% generation %}`` ``blocks``, the tokens of the blocks that overlap one, from the token
    holding a block's first character through the one holding its last (as transformers'
    ``return_assistant_tokens_mask`` counts them)."""
    ids, starts = tokenizer.encode_positions(text)
    mask = np.zeros(len(ids), dtype=np.uint8)
    if blocks is None:
        for start, end in turns:
            mask[(starts >= start) & (starts < end)] = 1
        return ChatRow(ids, mask)
    for a, b in blocks:
        if b > a and any(a < end and start < b for start, end in turns):
            first = max(int(np.searchsorted(starts, a, "right")) - 1, 0)
            last = int(np.searchsorted(starts, b - 1, "right")) - 1
            mask[first : last + 1] = 1
    return ChatRow(ids, mask)


def history_mismatch(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    options: RenderOptions = DEFAULT_RENDERING,
) -> str | None:
    """Where the template first rewrites history: the first message whose rendering as the last one is not how
    the whole conversation renders it, with the text from the first character that differs; None when none is."""
    rendered = apply_thinking(tokenizer, messages, resolve_thinking(tokenizer, options.thinking))
    variables = {"tools": tools} if tools else {}
    full = tokenizer.apply_chat_template(rendered, **variables)
    for i in range(len(rendered) - 1):
        alone = tokenizer.apply_chat_template(rendered[: i + 1], **variables)
        if not full.startswith(alone):
            at = next(k for k, (a, b) in enumerate(zip(alone, full, strict=False)) if a != b)
            return (
                f"message {i} ({rendered[i]['role']}) renders as {alone[at : at + 40]!r}... as the last message but "
                f"as {full[at : at + 40]!r}... once later ones follow"
            )
    return None


def marked_text(tokenizer: Tokenizer, row: ChatRow, colour: bool) -> str:
    """The row's text with its targets marked: green on a terminal (``colour``), else between ``[[`` and ``]]``."""
    opening, closing = ("\x1b[32m", "\x1b[0m") if colour else ("[[", "]]")
    ids, mask = row.ids.tolist(), row.mask.tolist()
    pieces, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            text = tokenizer.decode(ids[start:end])
            pieces.append(opening + text + closing if mask[start] else text)
            start = end
    return "".join(pieces)
