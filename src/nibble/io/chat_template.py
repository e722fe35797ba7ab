"""Chat templates rendered in a bounded sandbox: no unsafe attribute access (jinja2's immutable sandbox),
and a limit on the work and on the size of every value, so a template that loops for minutes or builds a
gigabyte string stops at once with one line naming the file it came from.

Bounds of one rendering:
- steps: every loop iteration and every call (functions, methods, macros, filters) counts one step; at most
  100,000 plus 256 per message (real templates take a few dozen per message);
- size: no string or list it builds (intermediate or output) may exceed 1 MiB plus 8 times the size of the
  messages. Operations that can multiply a size in one go (``*``, ``**``, ``%`` and ``format`` widths,
  ``replace``, ``join``, ``indent``, ``tojson``, printing nested lists, integer arguments such as
  ``center(10**9)``) are checked before they run; others are checked on their result.
"""

from __future__ import annotations

import contextvars
import functools
import json
import math
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any

from nibble.errors import NibbleError

MAX_TEMPLATE_CHARS = 1 << 20
BASE_CHARS = 1 << 20
BASE_STEPS = 100_000
_DIGITS = re.compile(r"\d+")


class TemplateLimit(Exception):
    """A rendering went over one of its bounds."""


class _TemplateRaised(Exception):
    """The template's own ``raise_exception(message)``."""


class _Budget:
    def __init__(self, max_chars: int, max_steps: int):
        self.steps = self.max_steps = max_steps
        self.max_chars = max_chars

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise TemplateLimit(f"it took more than {self.max_steps} steps (loop iterations and calls)")

    def fits(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise TemplateLimit(f"{what} would hold {size} characters or items, more than {self.max_chars}")


_BUDGET: contextvars.ContextVar[_Budget] = contextvars.ContextVar("chat_template_budget")


class _Tracker:
    """The characters a rendering has produced so far and the ``{% generation %}`` spans it has seen."""

    def __init__(self) -> None:
        self.chars = 0
        self.spans: list[tuple[int, int]] = []


_TRACKER: contextvars.ContextVar[_Tracker] = contextvars.ContextVar("chat_template_tracker")


def _budget() -> _Budget:
    return _BUDGET.get(None) or _Budget(BASE_CHARS, BASE_STEPS)  # (unset while jinja folds constants)


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, bytes, list, tuple, dict)) else 0


def _deep_size(value: Any, limit: int, indent: int = 0) -> int:
    """Characters and items of ``value`` counting nested containers each time they occur (about what printing
    or serializing it produces; with ``indent``, as indented JSON), or more than ``limit`` once it is over.
    Lists that hold one list a thousand times a few levels deep are small objects but astronomical texts;
    shared parts are measured once."""
    sizes: dict[tuple[int, int], int] = {}

    def size(item: Any, depth: int) -> int:
        total = 1 + indent * depth
        if isinstance(item, str):
            return total + len(item)
        if not isinstance(item, (list, tuple, dict)):
            return total
        key = (id(item), depth)
        if key not in sizes:
            children = [x for pair in item.items() for x in pair] if isinstance(item, dict) else item
            for child in children:
                total += size(child, depth + 1)
                if total > limit:
                    break
            sizes[key] = total
        return sizes[key]

    try:
        return size(value, 0)
    except RecursionError:
        return limit + 1


def _check_arguments(budget: _Budget, args: Iterable[Any], what: str) -> None:
    """Integer arguments are widths and counts, containers may be printed: neither may exceed the size bound."""
    for arg in args:
        kind = type(arg)
        if kind is str:
            continue
        if kind is int and abs(arg) > budget.max_chars:
            raise TemplateLimit(f"{what} was given {arg}, more than {budget.max_chars}")
        if kind in (list, tuple, dict):
            budget.fits(_deep_size(arg, budget.max_chars), f"a value given to {what}")


def _check_format(budget: _Budget, fmt: str) -> None:
    """A number in a format string may be a field width or precision: none may exceed the size bound."""
    for digits in _DIGITS.findall(fmt):
        if len(digits) > 9 or int(digits) > budget.max_chars:
            raise TemplateLimit(f"the format string {fmt[:40]!r} asks for a width of {digits}")


def _replaced_size(text: str, old: str, new: str, count: int = -1) -> int:
    hits = len(text) + 1 if old == "" else text.count(old)
    if count is not None and count >= 0:
        hits = min(hits, count)
    return len(text) + hits * (len(new) - len(old))


def _joined_size(separator: str, items: Sequence[Any]) -> int:
    return sum(len(x if isinstance(x, str) else str(x)) for x in items) + len(separator) * max(len(items) - 1, 0)


def _bounded(result: Any, budget: _Budget, what: str) -> Any:
    if type(result) in (str, list, tuple, dict, bytes):
        budget.fits(len(result), what)
    return result


def _steps(iterable: Iterable[Any]) -> Iterator[Any]:
    """A loop's iterable, one step per iteration."""
    budget = _budget()
    for item in iterable:
        budget.step()
        yield item


def _concat(parts: list[Any]) -> str:
    """``a ~ b ~ ...``, its size checked first."""
    budget = _budget()
    budget.fits(_deep_size(parts, budget.max_chars), "a '~' concatenation")
    return "".join(p if isinstance(p, str) else str(p) for p in parts)


def _finalize(value: Any) -> Any:
    """Every ``{{ value }}`` before it is printed (a string was bounded when it was built)."""
    if type(value) is not str:
        budget = _budget()
        budget.fits(_deep_size(value, budget.max_chars), "a printed value")
    return value


def _precheck_format(budget: _Budget, values: list[Any], kwargs: dict[str, Any]) -> None:
    if values and isinstance(values[0], str):
        _check_format(budget, values[0])


def _precheck_replace(budget: _Budget, values: list[Any], kwargs: dict[str, Any]) -> None:
    if len(values) >= 3 and all(isinstance(v, str) for v in values[:3]):
        budget.fits(_replaced_size(*values[:3], *values[3:4]), "filter 'replace'")


def _precheck_join(budget: _Budget, values: list[Any], kwargs: dict[str, Any]) -> None:
    if values:
        separator = values[1] if len(values) > 1 else kwargs.get("d", "")
        budget.fits(_joined_size(str(separator), values[0]), "filter 'join'")


def _precheck_tojson(budget: _Budget, values: list[Any], kwargs: dict[str, Any]) -> None:
    if values:
        width = kwargs.get("indent", values[2] if len(values) > 2 else None)
        width = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        budget.fits(_deep_size(values[0], budget.max_chars, width), "filter 'tojson'")


def _precheck_indent(budget: _Budget, values: list[Any], kwargs: dict[str, Any]) -> None:
    if values and isinstance(values[0], str):
        width = values[1] if len(values) > 1 else kwargs.get("width", 4)
        prefix = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        budget.fits(len(values[0]) + (values[0].count("\n") + 1) * prefix, "filter 'indent'")


# Filters whose result can be far larger than their arguments: checked before they run.
_PRECHECKS = {
    "format": _precheck_format,
    "replace": _precheck_replace,
    "join": _precheck_join,
    "tojson": _precheck_tojson,
    "indent": _precheck_indent,
}


def _guard_filter(name: str, function: Any) -> Any:
    """A filter that counts a step and checks its arguments before it runs and its result after."""
    precheck = _PRECHECKS.get(name)
    what = f"filter '{name}'"

    @functools.wraps(function)  # keeps jinja's pass_context/pass_environment marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get(None) or _Budget(BASE_CHARS, BASE_STEPS)
        budget.step()
        _check_arguments(budget, args, what)
        _check_arguments(budget, kwargs.values(), what)
        if precheck is not None:
            values = [a for a in args if not _is_jinja_internal(a)]
            if name == "join" and values:  # an iterator is read once: hand the filter the items measured
                items = list(values[0])
                args = tuple(items if a is values[0] else a for a in args)
                values[0] = items
            precheck(budget, values, kwargs)
        return _bounded(function(*args, **kwargs), budget, what)

    return guarded


def _is_jinja_internal(value: Any) -> bool:
    """The context, eval context or environment jinja passes to filters that ask for one."""
    return type(value).__module__.startswith("jinja2.")


def _environment():
    """The jinja2 environment chat templates render in (built once)."""
    import jinja2
    import jinja2.ext
    from jinja2 import nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for masking; it renders as is, and its
        character span in the output is recorded (as transformers records it: the block's text is placed after
        everything yielded before it)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller):
            text = caller()
            tracker = _TRACKER.get(None)
            if tracker is not None:
                tracker.spans.append((tracker.chars, tracker.chars + len(text)))
            return text

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%", "+"})

        def call_binop(self, context, operator, left, right):
            if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept fast
                if len(left) + len(right) > (_BUDGET.get(None) or _budget()).max_chars:
                    raise TemplateLimit(f"a '+' concatenation would hold {len(left) + len(right)} characters")
                return left + right
            budget = _budget()
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        budget.fits(len(seq) * max(n, 0), "a '*' repetition")
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                if right * math.log2(abs(left)) > 4096:
                    raise TemplateLimit(f"{left} ** {right} is larger than 4096 bits")
            if operator == "%" and isinstance(left, str):
                _check_format(budget, left)
            if operator == "+" and _size(left) and _size(right):
                budget.fits(_size(left) + _size(right), "a '+' concatenation")
            return _bounded(super().call_binop(context, operator, left, right), budget, f"a '{operator}' operation")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
            budget = _budget()
            budget.step()
            name = getattr(__obj, "__name__", "")
            _check_arguments(budget, [*args, *kwargs.values()], f"'{name}'")
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if isinstance(owner, str):
                if name in ("format", "format_map"):
                    _check_format(budget, owner)
                if name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
                    budget.fits(_replaced_size(owner, *args[:2], *args[2:3]), "'replace'")
                if name == "join" and len(args) == 1:
                    items = list(args[0])
                    budget.fits(_joined_size(owner, items), "'join'")
                    args = (items,)
            result = super().call(__context, __obj, *args, **kwargs)
            return _bounded(result, budget, f"'{name}'")

    class Bounds(jinja2.visitor.NodeTransformer):
        """Every loop iterates through ``_steps``; every ``~`` goes through ``_concat``."""

        def visit_For(self, node):
            node = self.generic_visit(node)
            node.iter = nodes.Filter(node.iter, "nibble_steps", [], [], None, None, lineno=node.lineno)
            return node

        def visit_Concat(self, node):
            node = self.generic_visit(node)
            return nodes.Filter(nodes.List(node.nodes), "nibble_concat", [], [], None, None, lineno=node.lineno)

    def raise_exception(message: str):
        raise _TemplateRaised(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which templates do not expect
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = BoundedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols], finalize=_finalize
    )
    env.filters["tojson"] = tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.filters["nibble_steps"] = _steps
    env.filters["nibble_concat"] = _concat
    env.globals.pop("lipsum", None)  # generates text by the paragraph count it is given; no template uses it
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.nibble_bounds = Bounds
    return env


@functools.cache
def _env():
    return _environment()


_TEMPLATES: dict[str, Any] = {}


def compile_template(template: str, source: str):
    """A compiled, bounded chat template (cached by its text).

    Raises:
        NibbleError: a template over 1 MiB or with a syntax error, naming ``source``.
    """
    if template not in _TEMPLATES:
        import jinja2

        if len(template) > MAX_TEMPLATE_CHARS:
            raise NibbleError(f"{source}: the chat template has {len(template)} characters, more than 1 MiB")
        env = _env()
        try:
            tree = env.nibble_bounds().visit(env.parse(template))
            _TEMPLATES[template] = env.from_string(tree)
        except jinja2.TemplateSyntaxError as exc:
            raise NibbleError(f"{source}: chat template syntax error on line {exc.lineno}: {exc.message}") from None
        except RecursionError:
            raise NibbleError(f"{source}: the chat template is nested too deeply") from None
    return _TEMPLATES[template]


def _line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:200] + "..."


def has_generation_blocks(template: str) -> bool:
    """Whether ``template`` marks assistant text with ``{% generation %}`` blocks."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def render(
    template: str,
    source: str,
    messages: list[dict[str, Any]],
    generation_spans: list[tuple[int, int]] | None = None,
    **variables: Any,
) -> str:
    """Render ``template`` with ``messages`` and ``variables`` within the bounds above; the character spans of
    the ``{% generation %}`` blocks it rendered are appended to ``generation_spans`` when given.

    Raises:
        NibbleError: a syntax error, a sandbox violation, an error raised by the template or while it runs,
            or a bound exceeded; one line naming ``source`` (the file the template came from).
    """
    import jinja2

    compiled = compile_template(template, source)
    text_chars = sum(len(v) for m in messages if isinstance(m, dict) for v in m.values() if isinstance(v, str))
    budget = _Budget(BASE_CHARS + 8 * text_chars, BASE_STEPS + 256 * len(messages))
    token = _BUDGET.set(budget)
    tracker = _Tracker()
    tracked = _TRACKER.set(tracker)
    pieces: list[str] = []
    try:
        for piece in compiled.generate(messages=messages, **variables):
            tracker.chars += len(piece)
            budget.fits(tracker.chars, "the rendered conversation")
            pieces.append(piece)
    except TemplateLimit as exc:
        raise NibbleError(f"{source}: chat template stopped: {_line(exc)}") from None
    except _TemplateRaised as exc:
        raise NibbleError(f"{source}: the chat template refuses this conversation: {_line(exc)}") from None
    except jinja2.exceptions.SecurityError as exc:
        raise NibbleError(f"{source}: the chat template tried something the sandbox forbids ({_line(exc)})") from None
    except Exception as exc:  # any error of the template's own code (TypeError, UndefinedError, ...)
        raise NibbleError(f"{source}: the chat template failed ({type(exc).__name__}: {_line(exc)})") from None
    finally:
        _BUDGET.reset(token)
        _TRACKER.reset(tracked)
    if generation_spans is not None:
        generation_spans.extend(tracker.spans)
    return "".join(pieces)
