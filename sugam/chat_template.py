"""Chat templates: jinja2's immutable sandbox, plus limits on work, time and size.

jinja2's sandbox stops a template from reaching Python internals, but not from working forever or
filling memory: `{% for i in range(10**5) %}{% for j in range(10**5) %}` runs for hours,
`'a' * 10**10` asks for 10 GB, `'{:>1000000000}'.format('a')` builds a 1 GB string. A model file
carries its own template, so even the served model's template is treated as untrusted code.

Every render gets a budget (`TemplateLimits`):

- steps: each loop iteration, call, filter, attribute or item lookup and intercepted operator
  costs one step; the wall-clock deadline is checked at every step, so a render that runs out of
  time stops itself (a thread cannot be killed from outside);
- size: no single string or list may grow past `max_output_chars`, and all text the template
  produces (output, intermediate strings, loop bodies) counts against `max_work_chars`;
- operations that can blow up in one step are checked *before* they run: `**` and `*` on numbers,
  `*` and `+` on strings and lists, `%` and `str.format` widths, string padding and replacing
  methods, the filters that pad, join, indent or repeat, `range` and `lipsum`.

A refused render raises `TemplateLimitError` naming the limit. The limits are far above what real
chat templates need: Qwen2.5 (with tools), Qwen3, QwQ, Llama 3.x and DeepSeek-R1 render a
2,700-message conversation with tools in under 80k steps and 0.2 s, and render it exactly as
jinja2 does without limits; templates that look ahead from every message (Command R7B, gpt-oss)
are quadratic and need 1.6-2.6 M steps and seconds for that many messages (docs/SERVER.md).
"""

from __future__ import annotations

import functools
import json
import operator
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame, optimizeconst
from jinja2.filters import make_attrgetter
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import generate_lorem_ipsum

from .errors import SugamError

# Names a caller's template variables may not set: the template source itself and what the
# renderer fills in. A request's chat_template_kwargs must never choose the template.
RESERVED_TEMPLATE_VARIABLES = frozenset({"chat_template", "messages", "tools", "add_generation_prompt"})


_END = object()  # marks an exhausted iterator in _Budget.text_size


class ChatTemplateError(SugamError):
    """The chat template refused the messages (raise_exception) or failed to render."""


class TemplateLimitError(ChatTemplateError):
    """The chat template went past one of the render limits and was stopped."""

    def __init__(self, limit: str, message: str):
        super().__init__(f"chat template stopped: {message}")
        self.limit, self.detail = limit, message

    def __reduce__(self) -> tuple[Any, ...]:  # crosses the process boundary from the server's render workers
        return type(self), (self.limit, self.detail)


@dataclass(frozen=True)
class TemplateLimits:
    """What one render may spend. See the module docstring for how each is counted."""

    # A 2,000-message conversation with tools costs Qwen3's template ~120k steps; templates that
    # look ahead from every message (gpt-oss) are quadratic and still fit at 1,000 messages.
    max_steps: int = 5_000_000
    # Real renders take milliseconds (the slowest real template seen: 3.5-5 s on 2,700 messages).
    max_seconds: float = 5.0
    # 8 M characters is 1-8 M tokens: more than any context sugam runs, and twice the server's
    # default 4 MiB request body, so no prompt that could fit is refused.
    max_output_chars: int = 8_000_000
    # Everything produced along the way (real templates produce 2-4x their output).
    max_work_chars: int = 64_000_000
    # Integers in chat templates are counters and indices; 4096 bits is ~1,200 digits.
    max_int_bits: int = 4096
    max_range: int = 100_000          # jinja2's own sandbox limit for range()
    max_nesting: int = 100            # macro / recursive-loop calls in progress at once
    max_lipsum_words: int = 10_000


DEFAULT_LIMITS = TemplateLimits()


class _Budget:
    """The running account of one render."""

    __slots__ = ("deadline", "depth", "limits", "steps", "work")

    def __init__(self, limits: TemplateLimits):
        self.limits = limits
        self.steps = 0
        self.work = 0
        self.depth = 0
        self.deadline = time.monotonic() + limits.max_seconds

    def tick(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.limits.max_steps:
            raise TemplateLimitError("steps", f"it took more than {self.limits.max_steps:,} steps")
        if time.monotonic() > self.deadline:
            raise TemplateLimitError("time", f"it ran longer than {self.limits.max_seconds:g} s")

    def charge(self, chars: int) -> None:
        self.work += chars
        if self.work > self.limits.max_work_chars:
            raise TemplateLimitError("work", f"it produced more than {self.limits.max_work_chars:,} characters "
                                             "of text along the way")

    def allow_size(self, size: int, what: str) -> None:
        """Refuse to build a string or list of `size` characters / items."""
        if size > self.limits.max_output_chars:
            raise TemplateLimitError("size", f"{what} would make a value of {size:,} characters or items "
                                             f"(limit {self.limits.max_output_chars:,})")

    def produced(self, value: Any) -> Any:
        """Account for a new value an operation returned."""
        if isinstance(value, (str, bytes, list, tuple)):
            self.allow_size(len(value), "an operation")
            self.charge(len(value))
        elif isinstance(value, int) and value.bit_length() > self.limits.max_int_bits:
            raise TemplateLimitError("size", f"an integer of {value.bit_length():,} bits (limit "
                                             f"{self.limits.max_int_bits:,})")
        return value

    def text_size(self, value: Any, indent: int = 0) -> int:
        """About how many characters `str(value)` (or its JSON) has: walks containers one step per
        item and stops once the size passes the limit, so that a list holding the same large
        string a million times is refused before it is printed. A container met again (the same
        object, nested twice) counts its known size without a second walk."""
        limit = self.limits.max_output_chars
        total, visited = 0, 0
        known: dict[tuple[int, int], int] = {}
        open_ids: set[int] = set()
        # Frames of (iterator over the container, its depth, total when it was entered, its id):
        # a stack of iterators, so a list of a million items is one frame, not a million entries.
        stack: list[tuple[Iterator[Any], int, int, int]] = [(iter((value,)), 0, 0, 0)]
        while stack:
            items, depth, entered, ident = stack[-1]
            item = next(items, _END)
            if item is _END:
                stack.pop()
                if stack:
                    open_ids.discard(ident)
                    known[ident, depth if indent else 0] = total - entered
                continue
            visited += 1
            if visited & 1023 == 0:
                self.tick(1024)
            total += indent * depth
            if isinstance(item, (str, bytes)):
                total += len(item) + 2
            elif isinstance(item, (list, tuple, dict)):
                key = (id(item), depth + 1 if indent else 0)
                if key in known:
                    total += known[key]
                elif id(item) in open_ids:
                    total += 5  # a container inside itself prints as [...]
                else:
                    total += 2
                    open_ids.add(id(item))
                    # (key, value) pairs of a dict are walked as 2-tuples
                    stack.append((iter(item.items() if isinstance(item, dict) else item), depth + 1, total, id(item)))
            elif isinstance(item, int):
                total += item.bit_length() // 3 + 2
            else:
                total += 32  # floats, None, Undefined, small jinja objects
            if total > limit:
                self.allow_size(total, "printing a value")
        self.tick(visited & 1023)
        return total


# The budget of the render running in this thread (renders run in worker threads; each sets its own).
_BUDGET: ContextVar[_Budget | None] = ContextVar("sugam_template_budget", default=None)


class _NotRendering(Exception):
    """Raised by guarded filters while jinja2 tries to fold constants at compile time: without a
    budget we let the filter run at render time instead, where it is checked."""


def _budget() -> _Budget:
    budget = _BUDGET.get()
    if budget is None:
        raise _NotRendering
    return budget


def _as_int(value: Any, default: int = 0) -> int:
    return value if isinstance(value, int) else default


# ---- checks for operations that can blow up in one step ------------------------------------------

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?([a-zA-Z%])")
_DIGITS = re.compile(r"\d+")


def _args_size(budget: _Budget, args: Iterable[Any]) -> int:
    return max((budget.text_size(a) for a in args), default=0)


def _check_percent_format(budget: _Budget, fmt: str, args: Any) -> None:
    """`fmt % args`: every conversion may print the largest argument, padded to its width."""
    values = list(args.values()) if isinstance(args, dict) else list(args) if isinstance(args, tuple) else [args]
    largest = _args_size(budget, values)
    size = len(fmt)
    for spec in _PERCENT_SPEC.finditer(fmt):
        width, precision, _ = spec.groups()
        if width == "*" or precision == "*":
            raise TemplateLimitError("format", "'*' widths in % formatting are not allowed")
        size += int(width or 0) + int(precision or 0) + largest
    budget.allow_size(size, "% formatting")


def _check_str_format(budget: _Budget, fmt: str, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """`fmt.format(...)`: like `%`; nested `{:{width}}` specs are refused outright."""
    largest = _args_size(budget, [*args, *kwargs.values()])
    size = len(fmt)
    for _, field, spec, _ in string.Formatter().parse(fmt):
        if field is None:
            continue
        if spec and "{" in spec:
            raise TemplateLimitError("format", "nested format specifications are not allowed")
        size += largest + sum(int(d) for d in _DIGITS.findall(spec or ""))
    budget.allow_size(size, "str.format")


def _replace_size(s: str | bytes, old: Any, new: Any, count: Any) -> int:
    if not isinstance(old, (str, bytes)) or not isinstance(new, (str, bytes)):
        return len(s)
    hits = s.count(old) if old else len(s) + 1  # type: ignore[arg-type]  # str in bytes raises TypeError, as replace() would
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _join_size(budget: _Budget, sep: Any, items: list[Any]) -> int:
    sep_len = len(sep) if isinstance(sep, (str, bytes)) else budget.text_size(sep)
    return budget.text_size(items) + sep_len * max(0, len(items) - 1)


def _check_method(budget: _Budget, obj: Any, args: tuple, kwargs: dict) -> tuple:
    """Methods of str / bytes / int whose result can be far larger than their inputs. Returns the
    arguments to call with (an iterator given to join is listed first, to be measured)."""
    owner, name = getattr(obj, "__self__", None), getattr(obj, "__name__", "")
    if isinstance(owner, (str, bytes)):
        if name in ("center", "ljust", "rjust", "zfill"):
            width = _as_int(args[0] if args else kwargs.get("width"))
            budget.allow_size(max(len(owner), width), f"str.{name}")
        elif name == "expandtabs":
            tabsize = _as_int(args[0] if args else kwargs.get("tabsize", 8), 8)
            tab = "\t" if isinstance(owner, str) else b"\t"
            budget.allow_size(len(owner) + owner.count(tab) * tabsize,  # type: ignore[arg-type]  # tab matches owner
                              "str.expandtabs")
        elif name == "replace" and len(args) >= 2:
            budget.allow_size(_replace_size(owner, args[0], args[1], args[2] if len(args) > 2 else
                                            kwargs.get("count", -1)), "str.replace")
        elif name == "join" and args:
            items = list(args[0])
            budget.tick(len(items))
            budget.allow_size(_join_size(budget, owner, items), "str.join")
            args = (items, *args[1:])
        elif name == "translate" and args and isinstance(args[0], dict):
            longest = max((len(v) for v in args[0].values() if isinstance(v, (str, bytes))), default=1)
            budget.allow_size(len(owner) * max(1, longest), "str.translate")
    elif isinstance(owner, int) and name == "to_bytes":
        budget.allow_size(_as_int(args[0] if args else kwargs.get("length", 1), 1), "int.to_bytes")
    return args


def _filter_value(args: tuple, offset: int) -> Any:
    return args[offset] if len(args) > offset else None


def _arg(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    """Argument `position` (counted after the value) of a filter call, by position or name."""
    return args[position] if len(args) > position else kwargs.get(name, default)


def _check_filter(budget: _Budget, name: str, env: jinja2.Environment, args: tuple, kwargs: dict) -> tuple:
    """The filters that can pad, repeat or join their way past the size limit, checked before
    they run. `args` starts at the filter's value."""
    value = args[0] if args else None
    text = value if isinstance(value, str) else None
    if name == "center" and text is not None:
        budget.allow_size(max(len(text), _as_int(_arg(args, kwargs, 1, "width", 80))), "center")
    elif name == "indent" and text is not None:
        width = _arg(args, kwargs, 1, "width", 4)
        per_line = len(width) if isinstance(width, str) else _as_int(width)
        budget.allow_size(len(text) + (text.count("\n") + 1) * per_line, "indent")
    elif name == "format" and text is not None:
        if kwargs:
            _check_percent_format(budget, text, dict(kwargs))
        else:
            _check_percent_format(budget, text, tuple(args[1:]))
    elif name == "replace" and text is not None:
        budget.allow_size(_replace_size(text, _arg(args, kwargs, 1, "old"), _arg(args, kwargs, 2, "new"),
                                        _arg(args, kwargs, 3, "count")), "replace")
    elif name == "wordwrap" and text is not None:
        width = max(1, _as_int(_arg(args, kwargs, 1, "width", 79), 79))
        wrap = _arg(args, kwargs, 3, "wrapstring") or "\n"
        budget.allow_size(len(text) + (len(text) // width + 1) * len(str(wrap)), "wordwrap")
    elif name == "join" and value is not None:
        attribute = _arg(args, kwargs, 2, "attribute")
        items = list(value)
        budget.tick(len(items))
        measured = list(map(make_attrgetter(env, attribute), items)) if attribute is not None else items
        budget.allow_size(_join_size(budget, _arg(args, kwargs, 1, "d", ""), measured), "join")
        args = (items, *args[1:])
    elif name in ("batch", "slice"):
        count = _as_int(_arg(args, kwargs, 1, "linecount" if name == "batch" else "slices"))
        if count > budget.limits.max_range:
            raise TemplateLimitError("size", f"{name}({count:,}) is beyond the limit of {budget.limits.max_range:,}")
    elif name == "tojson":
        indent = _arg(args, kwargs, 2, "indent")
        width = len(indent) if isinstance(indent, str) else _as_int(indent)
        if width > 16:
            raise TemplateLimitError("format", f"tojson indent of {width} (limit 16)")
        budget.text_size(value, indent=width)
    elif name == "round":
        precision = _as_int(_arg(args, kwargs, 1, "precision"))
        if abs(precision) > 1000:
            raise TemplateLimitError("format", f"round to {precision} digits (limit 1000)")
    elif name == "sum":
        start = _arg(args, kwargs, 2, "start", 0)
        if not isinstance(start, (int, float)):
            items = list(value or ())
            budget.tick(len(items))
            budget.allow_size(budget.text_size(start) + budget.text_size(items), "sum")
            args = (items, *args[1:])
    return args


# Filters whose value is a container they neither print nor compare item by item (no need to
# measure it first; join, sum and tojson measure what they need themselves).
_CONTAINER_FILTERS = frozenset({
    "attr", "batch", "count", "d", "default", "first", "items", "join", "last", "length", "list", "map",
    "random", "reject", "rejectattr", "reverse", "select", "selectattr", "slice", "sum", "tojson"})

_COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq, "ne": operator.ne, "gt": operator.gt, "gteq": operator.ge, "lt": operator.lt,
    "lteq": operator.le, "in": lambda a, b: a in b, "notin": lambda a, b: a not in b}
_CONTAINERS = (list, tuple, dict)


# ---- the environment ---------------------------------------------------------------------------


class _BudgetedCodeGenerator(CodeGenerator):
    """Compiles templates so that every loop iteration and every `~` concatenation is counted."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in node.find_all(nodes.For):
            # Static text in the body is written once per iteration: charge it per iteration.
            body = [*loop.body, *loop.else_]
            cost = sum(len(n.data) for part in body for n in part.find_all(nodes.TemplateData))
            cost += sum(len(n.value) for part in body for n in part.find_all(nodes.Const) if isinstance(n.value, str))
            loop.iter = nodes.Call(nodes.EnvironmentAttribute("sugam_loop"), [loop.iter, nodes.Const(cost)],
                                   [], None, None, lineno=loop.lineno)
        super().visit_Template(node, frame)

    @optimizeconst
    def visit_Compare(self, node: nodes.Compare, frame: Frame) -> None:
        # `a == b < c` -> environment.sugam_compare(a, (("eq", b), ("lt", c)))
        self.write("environment.sugam_compare(")
        self.visit(node.expr, frame)
        self.write(", (")
        for operand in node.ops:
            self.write(f"({operand.op!r}, ")
            self.visit(operand.expr, frame)
            self.write("), ")
        self.write("))")

    @optimizeconst
    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        if frame.eval_ctx.volatile or frame.eval_ctx.autoescape:
            super().visit_Concat(node, frame)
            return
        self.write("environment.sugam_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _CountedIterator:
    """Iterates a loop's sequence, one step (plus the body's static text) per item."""

    __slots__ = ("_budget", "_cost", "_iterator", "_source")

    def __init__(self, source: Any, budget: _Budget, cost: int):
        self._source, self._iterator, self._budget, self._cost = source, iter(source), budget, cost

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        item = next(self._iterator)
        self._budget.tick()
        if self._cost:
            self._budget.charge(self._cost)
        return item

    def __len__(self) -> int:  # lets loop.length skip listing the items; TypeError when unknown
        return len(self._source)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training; we render it plainly."""
    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


class LimitedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with the checks described in the module docstring; the budget
    itself belongs to each render (`render_template`)."""

    code_generator_class = _BudgetedCodeGenerator
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, finalize=self._finalize,
                         extensions=[jinja2.ext.loopcontrols, _GenerationTag])
        self.filters["tojson"] = _tojson
        self.filters = {name: self._guarded_filter(name, f) for name, f in self.filters.items()}
        self.globals["range"] = self._range
        self.globals["lipsum"] = self._lipsum
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now

    # -- hooks jinja2 calls ----------------------------------------------------------------------

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is None:
            return super().call(context, obj, *args, **kwargs)
        budget.tick()
        if isinstance(obj, LoopContext) and args:  # a recursive loop descending: count its items too
            args = (_CountedIterator(args[0], budget, 0), *args[1:])
        args = _check_method(budget, obj, args, kwargs)
        budget.depth += 1
        try:
            if budget.depth > budget.limits.max_nesting:
                raise TemplateLimitError("nesting", f"calls nested more than {budget.limits.max_nesting} deep")
            result = super().call(context, obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        return budget.produced(result)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        if budget is None:  # jinja2 never folds intercepted operators at compile time; be safe anyway
            raise _NotRendering
        budget.tick()
        limits = budget.limits
        ints = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and ints and right > 0 and abs(left) > 1:
            bits = (abs(left).bit_length() - 1) * right
            if bits > limits.max_int_bits:
                raise TemplateLimitError("size", f"{left} ** {right} would have about {bits:,} bits "
                                                 f"(limit {limits.max_int_bits:,})")
        elif operator == "*":
            if ints:
                if left.bit_length() + right.bit_length() > limits.max_int_bits:
                    raise TemplateLimitError("size", f"a product of more than {limits.max_int_bits:,} bits")
            elif isinstance(right, int) and isinstance(left, (str, bytes, list, tuple)):
                budget.allow_size(len(left) * right, "repeating a sequence")
            elif isinstance(left, int) and isinstance(right, (str, bytes, list, tuple)):
                budget.allow_size(len(right) * left, "repeating a sequence")
        elif operator == "+" and not ints and hasattr(left, "__len__") and hasattr(right, "__len__"):
            budget.allow_size(len(left) + len(right), "concatenation")
        elif operator == "%" and isinstance(left, str):
            _check_percent_format(budget, left, right)
        return budget.produced(self.binop_table[operator](left, right))

    def getattr(self, obj: Any, attribute: str) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget = _BUDGET.get()
        if budget is None:
            return super().getitem(obj, argument)
        budget.tick()
        value = super().getitem(obj, argument)
        return budget.produced(value) if isinstance(argument, slice) else value  # a slice is a new value

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        formatter = super().wrap_str_format(value)
        if formatter is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        @functools.wraps(formatter)
        def checked(*args: Any, **kwargs: Any) -> str:
            budget = _budget()
            budget.tick()
            mapping = args[0] if is_map and args and isinstance(args[0], Mapping) else kwargs
            _check_str_format(budget, fmt, () if is_map else args, mapping)
            return budget.produced(formatter(*args, **kwargs))

        return checked

    # -- sugam's own hooks (called from the compiled template) -------------------------------------

    def sugam_loop(self, iterable: Any, cost: int) -> Any:
        budget = _BUDGET.get()
        return iterable if budget is None else _CountedIterator(iterable, budget, cost)

    def sugam_concat(self, parts: tuple) -> str:
        budget = _BUDGET.get()
        if budget is not None:
            budget.tick()
            budget.allow_size(sum(len(p) if isinstance(p, str) else budget.text_size(p) for p in parts),
                              "'~' concatenation")
        return budget.produced("".join(map(str, parts))) if budget else "".join(map(str, parts))

    def sugam_compare(self, left: Any, operations: tuple[tuple[str, Any], ...]) -> bool:
        """A (chained) comparison. Comparing two containers walks both in C, where no step is
        counted: measure them first, so that two equal structures built to share their parts
        (and so to be exponentially large when walked) are refused instead of compared."""
        budget = _BUDGET.get()
        result = True
        for name, right in operations:
            if budget is not None:
                budget.tick()
                if isinstance(right, _CONTAINERS) and isinstance(left, _CONTAINERS):
                    budget.text_size(left)
                    budget.text_size(right)
                elif name in ("in", "notin") and isinstance(left, _CONTAINERS) and isinstance(right, (list, tuple)):
                    budget.text_size(right)
            result = _COMPARISONS[name](left, right)
            if not result:
                return result
            left = right
        return result

    def _finalize(self, value: Any) -> Any:
        """Every `{{ ... }}` output passes here: measure it before jinja2 turns it into text."""
        budget = _BUDGET.get()
        if budget is not None:
            size = len(value) if isinstance(value, str) else budget.text_size(value)
            budget.allow_size(size, "an output expression")
            budget.charge(size)
        return value

    def _guarded_filter(self, name: str, func: Callable[..., Any]) -> Callable[..., Any]:
        # Filters declared with pass_context / pass_eval_context / pass_environment get that first.
        offset = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
        measures_text = name not in _CONTAINER_FILTERS

        @functools.wraps(func)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            budget = _budget()
            budget.tick()
            value = _filter_value(args, offset)
            if measures_text and not isinstance(value, str):
                budget.text_size(value)
            checked = _check_filter(budget, name, self, args[offset:], kwargs)
            return budget.produced(func(*args[:offset], *checked, **kwargs))

        return guarded

    def _range(self, *args: int) -> range:
        budget = _budget()
        items = range(*args)
        if len(items) > budget.limits.max_range:
            raise TemplateLimitError("range", f"range of {len(items):,} items (limit {budget.limits.max_range:,})")
        return items

    def _lipsum(self, n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
        budget = _budget()
        if _as_int(n) * _as_int(max) > budget.limits.max_lipsum_words:
            raise TemplateLimitError("lipsum", f"lipsum of up to {_as_int(n) * _as_int(max):,} words "
                                               f"(limit {budget.limits.max_lipsum_words:,})")
        return generate_lorem_ipsum(n, html, min, max)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template: {message}")


def _strftime_now(fmt: str) -> str:
    if not isinstance(fmt, str) or len(fmt) > 256:
        raise ChatTemplateError("strftime_now takes a short format string")
    return datetime.now().strftime(fmt)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which changes the prompt text.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    """The template compiled once per source (a server renders the same one for every request)."""
    try:
        return LimitedSandbox().from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
    except RecursionError as exc:
        raise ChatTemplateError("chat template does not compile: nested too deeply") from exc


def render_template(source: str, variables: Mapping[str, Any], limits: TemplateLimits = DEFAULT_LIMITS) -> str:
    """Render a chat template within `limits`. Raises ChatTemplateError (TemplateLimitError for a
    limit) and nothing else."""
    if not isinstance(source, str):
        raise ChatTemplateError(f"the chat template must be text, not {type(source).__name__}")
    template = compile_template(source)
    budget = _Budget(limits)
    token = _BUDGET.set(budget)
    pieces: list[str] = []
    size = 0
    try:
        for piece in template.generate(**variables):
            size += len(piece)
            if size > limits.max_output_chars:
                raise TemplateLimitError("output", f"the prompt would be longer than {limits.max_output_chars:,} "
                                                   "characters")
            pieces.append(piece)
        return "".join(pieces)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:  # includes the sandbox's SecurityError
        raise ChatTemplateError(f"chat template failed: {exc}") from exc
    except RecursionError as exc:
        raise TemplateLimitError("nesting", "it recursed too deeply") from exc
    except MemoryError as exc:
        raise TemplateLimitError("memory", "it ran out of memory") from exc
    except Exception as exc:  # any other failure inside a template is the template's
        raise ChatTemplateError(f"chat template failed on these messages: {exc!r}") from exc
    finally:
        _BUDGET.reset(token)
