"""Chat templates rendered in a sandboxed Jinja environment set up like transformers'
(``utils/chat_template_utils.py``): an immutable sandbox, no template loading, ``namespace()`` without
underscore attributes, inputs rebuilt from plain JSON types, and transformers' ``tojson``,
``raise_exception`` and ``strftime_now``. Nothing here knows a tokenizer.

Rendering is also bounded in time and size (``TemplateLimits``): integers in arithmetic, the length of
strings and lists built by operators, the rendered output and the work done (loop iterations, calls and
operators counted together). A template past a limit raises ``TemplateLimitError`` naming it, before
the expensive step runs: ``{{ 10 ** 100000000 }}`` (minutes in one uninterruptible C call), nested
loops that would run for hours and ``{{ 'a' * 10**9 }}`` all stop at once. The defaults leave room for
real prompts with long RAG documents (16M characters of output).

Example::

    render_template("{{ bos_token }}{{ messages[0]['content'] }}",
                    {"bos_token": "<BOS_TOKEN>", "messages": normalize_messages([{"role": "user", "content": "Hi"}])})
    # '<BOS_TOKEN>Hi'
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
import json
import numbers
import operator
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.visitor import NodeTransformer
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "DEFAULT_LIMITS", "TemplateLimitError", "TemplateLimits", "UnsafeTemplateError",
           "compile_template", "normalize_messages", "plain_template_data", "render_template"]


class ChatTemplateError(jinja2.exceptions.TemplateError, ValueError):
    """A chat template failed: ``raise_exception(...)`` in the template (its message is kept), or a Jinja error."""


class UnsafeTemplateError(ChatTemplateError):
    """The sandbox stopped a chat template that tried an unsafe operation (dunder access, mutation, imports)."""


class TemplateLimitError(ChatTemplateError):
    """A chat template went past one of ``TemplateLimits`` (the message names the limit and its value)."""


@dataclass(frozen=True)
class TemplateLimits:
    """Bounds on one render. ``max_output_chars``: the rendered text, and any string or list an operator or
    filter builds; ``max_int_bits``: integers an operator produces; ``max_steps``: loop iterations, calls and
    operators together (a call counts 4; a million steps take about a second).

    Example::

        render_template(source, variables, limits=TemplateLimits(max_output_chars=64_000_000))
    """

    max_output_chars: int = 16_000_000
    max_int_bits: int = 65_536
    max_steps: int = 2_000_000


DEFAULT_LIMITS = TemplateLimits()


class _Budget:
    def __init__(self, limits: TemplateLimits) -> None:
        self.limits, self.steps = limits, 0

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > self.limits.max_steps:
            raise TemplateLimitError(f"chat template did more than max_steps={self.limits.max_steps} loop iterations, "
                                     "calls and operations (TemplateLimits.max_steps); is a loop unbounded?")

    def check_size(self, value: Any, what: str) -> Any:
        if isinstance(value, (str, list, tuple)) and len(value) > self.limits.max_output_chars:
            raise TemplateLimitError(f"chat template built a {type(value).__name__} of {len(value)} items with {what}, "
                                     f"over max_output_chars={self.limits.max_output_chars} (TemplateLimits)")
        return value


_BUDGET: ContextVar[_Budget | None] = ContextVar("chat_template_budget", default=None)


def _budget() -> _Budget:
    """The budget of the ``render_template`` call running; outside one (a bare ``compile_template(...).render``)
    a fresh one each time, so sizes are still bounded but nothing accumulates across renders."""
    return _BUDGET.get() or _Budget(DEFAULT_LIMITS)

_BINOPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
           "//": operator.floordiv, "%": operator.mod, "**": operator.pow}
_SIZED = (str, list, tuple)


def _check_binop(budget: _Budget, op: str, left: Any, right: Any) -> None:
    """Refuse, before computing it, a result over the limits (big integers, long strings/lists)."""
    limits = budget.limits
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (left, right))
    bits = None
    if ints and op == "**" and right > 0:
        bits = max(1, abs(left).bit_length() - 1) * right if abs(left) > 1 else 1
    elif ints and op == "*":
        bits = abs(left).bit_length() + abs(right).bit_length()
    if bits is not None and bits > limits.max_int_bits:
        raise TemplateLimitError(f"chat template computes {left!r:.40} {op} {right!r:.40}, an integer of about "
                                 f"{bits} bits, over max_int_bits={limits.max_int_bits} (TemplateLimits)")
    size = None
    if op == "*" and isinstance(left, _SIZED) and isinstance(right, int):
        size = len(left) * right
    elif op == "*" and isinstance(right, _SIZED) and isinstance(left, int):
        size = len(right) * left
    elif op == "+" and isinstance(left, _SIZED) and isinstance(right, _SIZED):
        size = len(left) + len(right)
    elif op == "%" and isinstance(left, str):   # "%0999999999d" % 1: refuse widths past the limit
        size = max([len(left), *(int(w) for w in re.findall(r"\d+", left) if len(w) < 30)], default=0)
        size = limits.max_output_chars + 1 if re.search(r"\d{30}", left) else size
    if size is not None and size > limits.max_output_chars:
        raise TemplateLimitError(f"chat template builds a sequence of {size} items with {op!r}, over "
                                 f"max_output_chars={limits.max_output_chars} (TemplateLimits)")


def _counted(iterable: Any) -> Any:
    """Every ``{% for %}`` loop iterates through this: one step per item."""
    budget = _budget()
    for item in iterable:
        budget.step()
        yield item


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Same as transformers: Jinja's own tojson escapes HTML characters, which templates do not expect.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys`` for templates without exposing the ``dict`` type (as transformers)."""

    __call__, fromkeys = staticmethod(dict), staticmethod(dict.fromkeys)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` refusing underscore attributes, so ``ns.__class__`` cannot be planted (as transformers)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick so namespace(self=...) works
        attrs = dict(*args[1:], **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(args[0], attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"storing the underscore attribute {name!r} on a namespace")


class _NoTemplateLoader(jinja2.BaseLoader):
    def get_source(self, environment: Any, template: str) -> Any:
        raise jinja2.exceptions.SecurityError(f"importing or including another template ({template!r})")


class _BoundedConcat(NodeTransformer):
    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), "_wb_concat", [], [], None, None,
                            lineno=node.lineno)


def _concat(items: list) -> str:
    """``a ~ b ~ c``, its length checked before joining (doubling a string in a loop grows without bound)."""
    budget = _budget()
    budget.step()
    parts = [str(x) for x in items]
    if sum(map(len, parts)) > budget.limits.max_output_chars:
        raise TemplateLimitError(f"chat template builds a string of {sum(map(len, parts))} characters with '~', over "
                                 f"max_output_chars={budget.limits.max_output_chars} (TemplateLimits)")
    return "".join(parts)


def _bounded_lipsum(fn: Any) -> Any:
    def lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> Any:  # noqa: A002 - Jinja's names
        if n * max > _budget().limits.max_output_chars // 8:
            raise TemplateLimitError(f"chat template asks lipsum for {n} paragraphs of up to {max} words, over "
                                     "max_output_chars (TemplateLimits)")
        return fn(n=n, html=html, min=min, max=max)
    return lipsum


class _ChatSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(_BINOPS)    # also keeps the optimizer from folding 10 ** 10**8 at compile time

    def _parse(self, source: str, name: Any, filename: Any) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):   # count loop iterations (the filters are registered below)
            loop.iter = nodes.Filter(loop.iter, "_wb_counted", [], [], None, None, lineno=loop.lineno)
        return _BoundedConcat().visit(tree)     # `a ~ b` is no binop: bound it through a filter too

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.step()
        _check_binop(budget, operator, left, right)
        return budget.check_size(_BINOPS[operator](left, right), repr(operator))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
        budget = _budget()
        budget.step(4)                                    # a call (a macro renders its body) costs more than a step
        bound = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)   # the sandbox wraps str.format
        if isinstance(bound, str) and getattr(__obj, "__name__", "") in ("format", "format_map"):
            _check_binop(budget, "%", bound, None)        # widths in "{:>999999999}" past the limit
        return budget.check_size(super().call(__context, __obj, *args, **kwargs), "a call")

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Jinja returns a silent Undefined for e.g. `(1).__class__`; fail loudly instead. No legitimate template
        # reads unsafe attributes, so this only changes what hostile templates see.
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object")


_SIZE_ARGS = {"center": 0, "indent": 0, "batch": 0, "slice": 0, "wordwrap": 0, "truncate": 0, "tojson": 2}


def _check_growth(budget: _Budget, name: str, args: tuple, kwargs: dict) -> None:
    """``join`` and ``replace`` can multiply their input's size: estimate the result before building it."""
    size = 0
    if name == "join" and args and isinstance(args[0], (list, tuple)):
        sep = args[1] if len(args) > 1 else kwargs.get("d", "")
        size = len(sep) * max(0, len(args[0]) - 1) if isinstance(sep, str) else 0
    elif name == "replace" and len(args) >= 3 and all(isinstance(a, str) for a in args[:3]) and args[1]:
        size = len(args[0]) + args[0].count(args[1]) * (len(args[2]) - len(args[1]))
    if size > budget.limits.max_output_chars:
        raise TemplateLimitError(f"chat template filter {name!r} would build {size} characters, over "
                                 f"max_output_chars={budget.limits.max_output_chars} (TemplateLimits)")


def _bounded_filter(name: str, fn: Any) -> Any:
    """A built-in filter whose size arguments (``center(10**9)``) and result are bounded like operators."""
    skip = 2 if hasattr(fn, "jinja_pass_arg") else 1      # pass_context / pass_environment filters get one more
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.step()
        values = [*args[skip:], *kwargs.values()]        # the size arguments after the filtered value
        if name in _SIZE_ARGS or name in ("format", "replace", "join"):
            big = [v for v in values if isinstance(v, int) and not isinstance(v, bool)
                   and abs(v) > budget.limits.max_output_chars]
            if big:
                raise TemplateLimitError(f"chat template filter {name!r} got size {big[0]}, over "
                                         f"max_output_chars={budget.limits.max_output_chars} (TemplateLimits)")
            if name == "format" and args:
                _check_binop(budget, "%", next((a for a in args if isinstance(a, str)), ""), None)
            _check_growth(budget, name, args[skip - 1:], kwargs)
        return budget.check_size(fn(*args, **kwargs), f"the filter {name!r}")

    for attr in ("jinja_pass_arg",):          # keep pass_context / pass_environment markers
        if hasattr(fn, attr):
            setattr(bounded, attr, getattr(fn, attr))
    return bounded


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The sandboxed, compiled template (cached by source; refuses jinja2 < 3.1.6)."""
    if tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6 (older ones have sandbox escapes): {jinja2.__version__}")
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, loader=_NoTemplateLoader(),
                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    for name, fn in list(env.filters.items()):
        env.filters[name] = _bounded_filter(name, fn)
    env.filters.update(_wb_counted=_counted, _wb_concat=_concat)
    env.globals["lipsum"] = _bounded_lipsum(env.globals["lipsum"])
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error (line {e.lineno}): {e.message}") from e


def render_template(source: str, variables: dict[str, Any], limits: TemplateLimits | None = None) -> str:
    """Render a chat template with ``variables``; template failures raise ``ChatTemplateError``, sandbox
    violations ``UnsafeTemplateError``, going past ``limits`` (default ``DEFAULT_LIMITS``) ``TemplateLimitError``."""
    template = compile_template(source)
    budget = _Budget(limits or DEFAULT_LIMITS)
    token = _BUDGET.set(budget)
    try:
        chunks, size = [], 0
        for chunk in template.generate(**variables):      # streamed, so the output bound holds as it grows
            size += len(chunk)
            if size > budget.limits.max_output_chars:
                raise TemplateLimitError(f"chat template output passed max_output_chars="
                                         f"{budget.limits.max_output_chars} characters (TemplateLimits)")
            chunks.append(chunk)
        return "".join(chunks)
    except ChatTemplateError:
        raise
    except RecursionError as e:
        raise TemplateLimitError(f"chat template recursed too deeply (Python's recursion limit): {e}") from e
    except jinja2.exceptions.SecurityError as e:
        raise UnsafeTemplateError(f"the chat template tried an unsafe operation, stopped by the sandbox: {e}") from e
    except jinja2.exceptions.TemplateRuntimeError as e:
        if "assign attribute" in str(e):  # `{% set obj.attr = … %}` on anything but a namespace
            raise UnsafeTemplateError(f"the chat template tried an unsafe operation (assignment): {e}") from e
        raise ChatTemplateError(f"chat template failed: {e}") from e
    except Exception as e:  # noqa: BLE001 - e.g. `'a' + 1` inside the template; keep the cause chained
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    finally:
        _BUDGET.reset(token)


def plain_template_data(value: Any) -> Any:
    """Rebuild template inputs from plain JSON types (transformers' `_plain_template_data`): rich objects carry
    methods the sandbox cannot judge, so anything else becomes an inert ``"<TypeName>"`` placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # str subclasses (enums) carry extra methods; str.__str__ gives the plain value
        return str.__str__(value)
    for base, kind in ((bool, bool), (int, numbers.Integral), (float, numbers.Real)):  # IntEnum, numpy scalars
        if isinstance(value, kind):
            return base(value)
    if isinstance(value, Mapping):
        return {plain_template_data(k): plain_template_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return (list if isinstance(value, list) else tuple)(plain_template_data(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_template_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


def normalize_messages(messages: Sequence[Any]) -> list[dict]:
    """Dicts only; drop keys whose value is None; alias reasoning fields (as transformers 5 does)."""
    out = []
    for message in plain_template_data(list(messages)):
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in ("reasoning_content", "thinking", "reasoning") if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out
