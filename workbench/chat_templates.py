"""Chat templates rendered in a sandboxed Jinja environment set up like transformers'
(``utils/chat_template_utils.py``): an immutable sandbox, no template loading, ``namespace()`` without
underscore attributes, inputs rebuilt from plain JSON types, and transformers' ``tojson``,
``raise_exception`` and ``strftime_now``. Nothing here knows a tokenizer.

Example::

    render_template("{{ bos_token }}{{ messages[0]['content'] }}",
                    {"bos_token": "<BOS_TOKEN>", "messages": normalize_messages([{"role": "user", "content": "Hi"}])})
    # '<BOS_TOKEN>Hi'
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "UnsafeTemplateError", "compile_template", "normalize_messages",
           "plain_template_data", "render_template"]


class ChatTemplateError(jinja2.exceptions.TemplateError, ValueError):
    """A chat template failed: ``raise_exception(...)`` in the template (its message is kept), or a Jinja error."""


class UnsafeTemplateError(ChatTemplateError):
    """The sandbox stopped a chat template that tried an unsafe operation (dunder access, mutation, imports)."""


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


class _ChatSandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Jinja returns a silent Undefined for e.g. `(1).__class__`; fail loudly instead. No legitimate template
        # reads unsafe attributes, so this only changes what hostile templates see.
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object")


@lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """The sandboxed, compiled template (cached by source; refuses jinja2 < 3.1.6)."""
    if tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6 (older ones have sandbox escapes): {jinja2.__version__}")
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, loader=_NoTemplateLoader(),
                       extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt),
                       dict=_TemplateDict(), namespace=_TemplateNamespace)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template syntax error (line {e.lineno}): {e.message}") from e


def render_template(source: str, variables: dict[str, Any]) -> str:
    """Render a chat template with ``variables``; template failures raise ``ChatTemplateError``, sandbox
    violations ``UnsafeTemplateError``."""
    template = compile_template(source)
    try:
        return template.render(**variables)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.SecurityError as e:
        raise UnsafeTemplateError(f"the chat template tried an unsafe operation, stopped by the sandbox: {e}") from e
    except jinja2.exceptions.TemplateRuntimeError as e:
        if "assign attribute" in str(e):  # `{% set obj.attr = … %}` on anything but a namespace
            raise UnsafeTemplateError(f"the chat template tried an unsafe operation (assignment): {e}") from e
        raise ChatTemplateError(f"chat template failed: {e}") from e
    except Exception as e:  # noqa: BLE001 - e.g. `'a' + 1` inside the template; keep the cause chained
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e


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
