"""Regular expressions from files matched without backtracking: PEFT reads a string ``target_modules`` as a
pattern that must match a whole module name, and a pattern such as ``(.*.*)*X`` makes a backtracking matcher
(Python's ``re``) take time exponential in the name's length.

The pattern is parsed by Python's own parser (so it means what ``re.fullmatch`` would take it to mean) and
compiled into a Thompson automaton whose states are all followed at once: matching costs at most
(states x characters) steps, whatever the pattern. Features with no automaton (backreferences, lookarounds,
atomic groups, possessive repeats, inline flags) are refused, as is a pattern longer than ``MAX_PATTERN``
characters or one that expands to more than ``MAX_STATES`` states (``(?:a{1000}){1000}``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from nibble.errors import NibbleError

try:  # the parser re itself uses: private since Python 3.11, public before
    from re import _constants as sre  # type: ignore[attr-defined]
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover
    import sre_constants as sre  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

MAX_PATTERN = 1000
MAX_STATES = 20_000

_CATEGORIES: dict[object, Callable[[str], bool]] = {
    sre.CATEGORY_DIGIT: str.isdecimal,
    sre.CATEGORY_NOT_DIGIT: lambda c: not c.isdecimal(),
    sre.CATEGORY_WORD: lambda c: c.isalnum() or c == "_",
    sre.CATEGORY_NOT_WORD: lambda c: not (c.isalnum() or c == "_"),
    sre.CATEGORY_SPACE: str.isspace,
    sre.CATEGORY_NOT_SPACE: lambda c: not c.isspace(),
}


@dataclass
class _State:
    test: Callable[[str], bool] | None = None  # consumes one character that passes; None: an epsilon state
    at: object = None  # an epsilon state's position assertion (the start or the end of the name)
    out: list[int] = field(default_factory=list)


class FullMatch:
    """A pattern that matches whole strings like ``re.fullmatch``, in time linear in the string's length.

    Raises:
        NibbleError: the pattern is invalid, too long, too large, or uses what has no automaton (``what`` names
            where the pattern came from).
    """

    def __init__(self, pattern: str, what: str):
        self.what = what
        if len(pattern) > MAX_PATTERN:
            self._refuse(f"is {len(pattern)} characters long; at most {MAX_PATTERN}")
        try:
            parsed = sre_parse.parse(pattern)
        except re.error as exc:
            self._refuse(f"is not a valid regular expression ({exc})")
        except RecursionError:
            self._refuse("nests groups too deeply")
        if parsed.state.flags & ~(re.UNICODE | re.ASCII):
            self._refuse("sets inline flags; write the pattern without (?...) flags")
        self.states: list[_State] = []
        start, ends = self._sequence(list(parsed))
        self.start = start
        self.accept = self._new()
        for end in ends:
            self.states[end].out.append(self.accept)

    def _refuse(self, why: str) -> None:
        raise NibbleError(f"{self.what} {why}; list the module names instead")

    def _new(self, test: Callable[[str], bool] | None = None, at: object = None) -> int:
        if len(self.states) >= MAX_STATES:
            self._refuse(f"expands to more than {MAX_STATES} automaton states")
        self.states.append(_State(test, at))
        return len(self.states) - 1

    def _link(self, ends: list[int], to: int) -> None:
        for end in ends:
            self.states[end].out.append(to)

    def _sequence(self, items: list) -> tuple[int, list[int]]:
        """The fragment of ``items`` in order: its entry state and the states whose exits are still open."""
        start = self._new()
        ends = [start]
        for op, arg in items:
            first, last = self._item(op, arg)
            self._link(ends, first)
            ends = last
        return start, ends

    def _item(self, op: object, arg) -> tuple[int, list[int]]:
        if op is sre.LITERAL:
            char = chr(arg)
            s = self._new(lambda c, char=char: c == char)
        elif op is sre.NOT_LITERAL:
            char = chr(arg)
            s = self._new(lambda c, char=char: c != char)
        elif op is sre.ANY:
            s = self._new(lambda c: c != "\n")
        elif op is sre.IN:
            s = self._new(self._set(arg))
        elif op is sre.AT:
            if arg not in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING, sre.AT_END, sre.AT_END_STRING):
                self._refuse(f"uses the assertion {arg}, which nibble does not match")
            s = self._new(at=arg)
        elif op is sre.SUBPATTERN:
            _, add_flags, del_flags, items = arg
            if add_flags or del_flags:
                self._refuse("sets inline flags; write the pattern without (?...) flags")
            return self._sequence(list(items))
        elif op is sre.BRANCH:
            start = self._new()
            ends: list[int] = []
            for items in arg[1]:
                first, last = self._sequence(list(items))
                self.states[start].out.append(first)
                ends += last
            return start, ends
        elif op in (sre.MAX_REPEAT, sre.MIN_REPEAT):  # (lazy or greedy: the same set of matches)
            return self._repeat(*arg)
        else:
            self._refuse(f"uses {str(op).lower()}, which has no backtracking-free match")
        return s, [s]

    def _repeat(self, low: int, high: int, items) -> tuple[int, list[int]]:
        start = self._new()
        ends = [start]
        for _ in range(low):
            first, last = self._sequence(list(items))
            self._link(ends, first)
            ends = last
        if high == sre.MAXREPEAT:
            loop = self._new()
            self._link(ends, loop)
            first, last = self._sequence(list(items))
            self.states[loop].out.append(first)
            self._link(last, loop)
            return start, [loop]
        optional: list[int] = []
        for _ in range(high - low):
            optional += ends
            first, last = self._sequence(list(items))
            self._link(ends, first)
            ends = last
        return start, optional + ends

    def _set(self, items) -> Callable[[str], bool]:
        negate = bool(items) and items[0][0] is sre.NEGATE
        tests: list[Callable[[str], bool]] = []
        for op, arg in items[1:] if negate else items:
            if op is sre.LITERAL:
                tests.append(lambda c, code=arg: ord(c) == code)
            elif op is sre.RANGE:
                tests.append(lambda c, codes=arg: codes[0] <= ord(c) <= codes[1])
            elif op is sre.CATEGORY and arg in _CATEGORIES:
                tests.append(_CATEGORIES[arg])
            else:
                self._refuse(f"uses {op} in a character set, which nibble does not match")
        return lambda c: any(t(c) for t in tests) != negate

    def _closure(self, states: set[int], pos: int, n: int) -> set[int]:
        todo, seen = list(states), set(states)
        while todo:
            s = todo.pop()
            state = self.states[s]
            if state.test is not None:
                continue
            if state.at in (sre.AT_BEGINNING, sre.AT_BEGINNING_STRING) and pos != 0:
                continue
            if state.at in (sre.AT_END, sre.AT_END_STRING) and pos != n:
                continue
            for t in state.out:
                if t not in seen:
                    seen.add(t)
                    todo.append(t)
        return seen

    def __call__(self, text: str) -> bool:
        """Whether the whole of ``text`` matches."""
        current = self._closure({self.start}, 0, len(text))
        for pos, char in enumerate(text):
            step = {
                t
                for s in current
                if (test := self.states[s].test) is not None and test(char)
                for t in self.states[s].out
            }
            if not step:
                return False
            current = self._closure(step, pos + 1, len(text))
        return self.accept in current
