"""GRPO's rewards: built-ins that need no code, weighted sums of them, and the user's own Python functions.

A reward is a batched function called as TRL calls its reward functions -- ``fn(prompts=[...],
completions=[...], **columns)``, one list per data column, every list one entry per completion -- and returning
one float per completion. The config names them as a list (YAML ``rewards:``), each entry a built-in's name, a
``module:function``, or a mapping with ``type`` (one of those), an optional ``weight`` (default 1) and the
built-in's settings:

- ``exact``: 1 when the answer parsed from the completion equals the row's ``column`` (default ``answer``), else 0;
  ``parse`` is ``last_number`` (default; numbers compare by value, "1,000" = "1000.0"), ``boxed`` (the last
  ``\\boxed{...}``), ``tag`` (the last ``<answer>...</answer>``, ``tag: answer``), ``regex`` (``pattern``'s first
  group, or the match) or ``text`` (the whole completion, stripped).
- ``numeric``: 1 when the parsed number is within ``tolerance`` (default 1e-6, absolute; ``relative: true``
  scales it by |answer|) of the column's, else 0.
- ``regex``: 1 when ``pattern`` matches (``full: true``: the whole stripped completion), else 0.
- ``length``: ``-penalty x |characters - target|`` (default penalty 0.001).
- ``json``: 1 when the parsed text (default the whole completion) is JSON valid against ``schema``, else 0.

A user's function is imported only when named. A reward that raises, or returns a wrong count or a non-finite
value, is a :class:`RewardError` naming the function and the row; nothing is silently zeroed.
"""

from __future__ import annotations

import importlib
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from nibble.errors import NibbleError, StepFailed
from nibble.train.tasks.json_schema import schema_errors, validates

RewardFn = Callable[..., Sequence[float]]
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
PARSE_RULES = ("last_number", "boxed", "tag", "regex", "text")


class RewardError(StepFailed):
    """A reward function failed on a batch: ``row`` is the completion's index in the batch (None: the whole call)."""

    def __init__(self, message: str, *, function: str, row: int | None):
        super().__init__(message)
        self.function, self.row = function, row


@dataclass(frozen=True)
class Answer:
    """How to find the answer in a completion: one of :data:`PARSE_RULES`, with its tag or pattern."""

    rule: str = "last_number"
    tag: str = "answer"
    pattern: str | None = None

    def find(self, text: str) -> str | None:
        """The answer in ``text``, or None when there is none."""
        if self.rule == "text":
            return text.strip()
        if self.rule == "last_number":
            found = NUMBER.findall(text)
            return found[-1] if found else None
        if self.rule == "boxed":
            return last_boxed(text)
        if self.rule == "tag":
            found = re.findall(rf"<{re.escape(self.tag)}>(.*?)</{re.escape(self.tag)}>", text, re.DOTALL)
            return found[-1].strip() if found else None
        match = re.search(self.pattern or "", text, re.DOTALL)
        if match is None:
            return None
        return (match.group(1) if match.groups() else match.group(0)).strip()


def last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` in ``text`` (braces inside it balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth < 0:
            return text[begin:i].strip()
    return None


def as_number(text: Any) -> float | None:
    """``text`` as a float ("1,000" and "$3" included), or None when it is not a number."""
    if isinstance(text, bool):
        return None
    if isinstance(text, int | float):
        return float(text)
    found = NUMBER.findall(str(text))
    if len(found) != 1:
        return None
    return float(found[0].replace(",", ""))


def same_answer(found: str | None, expected: Any, numeric: bool) -> bool:
    """Whether a parsed answer equals the expected one: by value for numbers, else as stripped text."""
    if found is None:
        return False
    if numeric:
        a, b = as_number(found), as_number(expected)
        return a is not None and b is not None and a == b
    return found == str(expected).strip()


@dataclass(frozen=True)
class Reward:
    """One named reward with its weight in the total; ``columns`` are the data columns a built-in reads."""

    name: str
    weight: float
    fn: RewardFn
    columns: tuple[str, ...] = ()

    def __call__(self, prompts: list, completions: list[str], columns: Mapping[str, list]) -> list[float]:
        """The reward of each completion.

        Raises:
            RewardError: the function raised, returned the wrong number of values, or a non-finite one.
        """
        try:
            values = list(self.fn(prompts=prompts, completions=completions, **columns))
        except Exception as exc:  # noqa: BLE001 -- a user's function may raise anything; name it and stop
            raise RewardError(
                f"reward {self.name} raised {type(exc).__name__}: {exc}; fix the function or the data",
                function=self.name,
                row=None,
            ) from exc
        if len(values) != len(completions):
            raise RewardError(
                f"reward {self.name} returned {len(values)} values for {len(completions)} completions",
                function=self.name,
                row=None,
            )
        for row, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise RewardError(
                    f"reward {self.name} returned {value!r} for completion {row}; return finite floats",
                    function=self.name,
                    row=row,
                )
        return [float(v) for v in values]


def exact_reward(*, column: str = "answer", parse: str = "last_number", **rule: Any) -> RewardFn:
    answer = Answer(parse, **rule)

    def score(*, completions: list[str], **columns: Any) -> list[float]:
        expected = needed_column(columns, column)
        numeric = parse == "last_number"
        return [float(same_answer(answer.find(c), e, numeric)) for c, e in zip(completions, expected, strict=True)]

    return score


def numeric_reward(
    *, column: str = "answer", parse: str = "last_number", tolerance: float = 1e-6, relative: bool = False, **rule: Any
) -> RewardFn:
    answer = Answer(parse, **rule)

    def close(found: str | None, expected: Any) -> bool:
        a, b = as_number(found) if found is not None else None, as_number(expected)
        if a is None or b is None:
            return False
        return abs(a - b) <= tolerance * (abs(b) if relative else 1.0)

    def score(*, completions: list[str], **columns: Any) -> list[float]:
        expected = needed_column(columns, column)
        return [float(close(answer.find(c), e)) for c, e in zip(completions, expected, strict=True)]

    return score


def regex_reward(*, pattern: str, full: bool = False) -> RewardFn:
    compiled = re.compile(pattern, re.DOTALL)
    match = compiled.fullmatch if full else compiled.search

    def score(*, completions: list[str], **_: Any) -> list[float]:
        return [float(match(c.strip() if full else c) is not None) for c in completions]

    return score


def length_reward(*, target: int, penalty: float = 0.001) -> RewardFn:
    def score(*, completions: list[str], **_: Any) -> list[float]:
        return [-penalty * abs(len(c) - target) for c in completions]

    return score


def json_reward(*, schema: Mapping[str, Any] | None = None, parse: str = "text", **rule: Any) -> RewardFn:
    answer = Answer(parse, **rule)
    schema = dict(schema or {})

    def valid(text: str | None) -> bool:
        if text is None:
            return False
        try:
            value = json.loads(text)
        except ValueError:
            return False
        return validates(value, schema)

    def score(*, completions: list[str], **_: Any) -> list[float]:
        return [float(valid(answer.find(c))) for c in completions]

    return score


BUILT_INS: dict[str, Callable[..., RewardFn]] = {
    "exact": exact_reward,
    "numeric": numeric_reward,
    "regex": regex_reward,
    "length": length_reward,
    "json": json_reward,
}


def needed_column(columns: Mapping[str, list], name: str) -> list:
    if name not in columns:
        raise NibbleError(f"the reward reads column '{name}', which the data lacks; add it or set the reward's column")
    return columns[name]


def import_reward(target: str) -> RewardFn:
    """The function ``module:function`` names (imported now, only because it was named)."""
    module_name, _, attr = target.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise NibbleError(f"reward {target}: cannot import it ({exc}); check the module is on the path") from None
    if not callable(fn):
        raise NibbleError(f"reward {target} is not a function")
    return fn


def build_reward(entry: str | Mapping[str, Any], index: int) -> Reward:
    """One entry of the ``rewards`` list (see the module docstring) as a :class:`Reward`.

    Raises:
        NibbleError: an unknown type, a bad setting, or a function that does not import.
    """
    spec = {"type": entry} if isinstance(entry, str) else dict(entry)
    where = f"'rewards' entry {index}"
    kind = spec.pop("type", None)
    weight = spec.pop("weight", 1.0)
    name = spec.pop("name", kind)
    if not isinstance(kind, str):
        raise NibbleError(f"{where}: give a 'type' ({', '.join(BUILT_INS)}, or module:function)")
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight):
        raise NibbleError(f"{where}: 'weight' {weight!r} must be a finite number")
    if ":" in kind:
        if spec:
            raise NibbleError(f"{where}: a module:function reward takes no settings ({', '.join(spec)})")
        return Reward(str(name), float(weight), import_reward(kind))
    if kind not in BUILT_INS:
        raise NibbleError(
            f"{where}: type '{kind}' is not a reward; use one of {', '.join(BUILT_INS)}, or module:function"
        )
    if spec.get("parse", "last_number") not in PARSE_RULES:
        raise NibbleError(f"{where}: 'parse' {spec['parse']!r} is not known; use one of {', '.join(PARSE_RULES)}")
    if "pattern" in spec:
        try:
            re.compile(spec["pattern"])
        except re.error as exc:
            raise NibbleError(f"{where}: 'pattern' {spec['pattern']!r} is not a regular expression ({exc})") from None
    if kind == "json":
        problems = schema_errors(spec.get("schema") or {})
        if problems:
            raise NibbleError(f"{where}: 'schema' {problems[0]}")
    try:
        fn = BUILT_INS[kind](**spec)
    except TypeError as exc:
        raise NibbleError(f"{where}: bad settings for {kind} ({exc}); see the GRPO section of the README") from None
    reads = (spec.get("column", "answer"),) if kind in ("exact", "numeric") else ()
    return Reward(str(name), float(weight), fn, reads)


def check_columns(rewards: Sequence[Reward], columns: Sequence[str], source: str) -> None:
    """Raise NibbleError when a built-in reward reads a column the data ``source`` lacks."""
    for reward in rewards:
        for column in reward.columns:
            if column not in columns:
                raise NibbleError(
                    f"{source}: reward {reward.name} reads column '{column}', which the rows lack; add it or set "
                    "the reward's 'column'"
                )


def build_rewards(entries: Sequence[str | Mapping[str, Any]]) -> list[Reward]:
    """The ``rewards`` list as :class:`Reward` objects, their names made unique (``exact``, ``exact_2``...)."""
    if not entries:
        raise NibbleError("task grpo needs 'rewards': a list of built-ins (exact, regex, ...) or module:function")
    rewards = [build_reward(entry, i) for i, entry in enumerate(entries)]
    seen: dict[str, int] = {}
    unique = []
    for reward in rewards:
        seen[reward.name] = seen.get(reward.name, 0) + 1
        name = reward.name if seen[reward.name] == 1 else f"{reward.name}_{seen[reward.name]}"
        unique.append(Reward(name, reward.weight, reward.fn, reward.columns))
    return unique


def score(
    rewards: Sequence[Reward], prompts: list, completions: list[str], columns: Mapping[str, list]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every reward of every completion: ``(per_function [N, F], total [N])``, total the weighted sum (float64)."""
    per_function = torch.tensor([reward(prompts, completions, columns) for reward in rewards], dtype=torch.float64).T
    weights = torch.tensor([reward.weight for reward in rewards], dtype=torch.float64)
    return per_function, per_function @ weights
