"""Control-token text in untrusted chat fields, kept as plain text (``escape_special_tokens=True``).

A tokenizer matches its added tokens (``<|END_OF_TURN_TOKEN|>``, ``<|START_OF_TURN_TOKEN|>``, ...) anywhere
in the rendered prompt, so a user message, a tool description or a retrieved document that contains
such text injects a real control token — transformers does exactly that, and so does our default.
The escaping here works in two halves around the template: before rendering, every control-token
string in the untrusted fields becomes one private-use marker character (templates pass it through
like any other character); after rendering, the text is cut at the markers, the parts between them
are tokenized as usual (the same cuts an added token makes, so those ids are unchanged) and each
marker is tokenized as the plain text of its control token. Nothing here knows a tokenizer.

Example::

    marked = mark_control_text({"content": "a<|END_OF_TURN_TOKEN|>b"}, ["<|END_OF_TURN_TOKEN|>"])
    split_marked(render(marked), ["<|END_OF_TURN_TOKEN|>"])   # [("...a", None), ("", "<|END_OF_TURN_TOKEN|>"), ...]
"""

from __future__ import annotations

import re
from typing import Any, Optional, Sequence

__all__ = ["MARKER_BASE", "mark_control_text", "split_marked"]

# Supplementary Private Use Area-B: never produced by a tokenizer or a template; input holding it is refused.
MARKER_BASE = 0x100000


def _marker_re(specials: Sequence[str]) -> re.Pattern:
    ordered = sorted(specials, key=len, reverse=True)             # longest first: no prefix wins early
    return re.compile("|".join(re.escape(s) for s in ordered))


def mark_control_text(value: Any, specials: Sequence[str], skip_keys: Sequence[str] = ()) -> Any:
    """``value`` (JSON-like data) with each control-token string inside its strings replaced by a marker.

    Keys of dicts are kept; values under ``skip_keys`` (e.g. ``"role"``) are left alone.

    Example::

        mark_control_text(["x<BOS_TOKEN>"], ["<BOS_TOKEN>"])     # ['x\\U00100000']
    """
    specials = list(specials)
    pattern = _marker_re(specials)
    index = {s: i for i, s in enumerate(specials)}

    def walk(v: Any) -> Any:
        if isinstance(v, str):
            if any(MARKER_BASE <= ord(c) < MARKER_BASE + 0x10000 for c in v):
                raise ValueError("escape_special_tokens: a chat field holds a character of the private-use area "
                                 f"U+{MARKER_BASE:X}..U+{MARKER_BASE + 0xFFFF:X}, which the escaping reserves")
            return pattern.sub(lambda m: chr(MARKER_BASE + index[m.group(0)]), v)
        if isinstance(v, dict):
            return {k: (x if k in skip_keys else walk(x)) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(walk(x) for x in v)
        return v

    return walk(value) if specials else value


def split_marked(text: str, specials: Sequence[str]) -> list[tuple[str, Optional[str]]]:
    """Cut rendered ``text`` at the markers: ``(plain text, None)`` and ``("", control-token text)`` parts, in order.

    Example::

        split_marked("a\\U00100000b", ["<BOS_TOKEN>"])   # [("a", None), ("", "<BOS_TOKEN>"), ("b", None)]
    """
    parts: list[tuple[str, Optional[str]]] = []
    start = 0
    for i, c in enumerate(text):
        k = ord(c) - MARKER_BASE
        if 0 <= k < len(specials):
            parts.append((text[start:i], None))
            parts.append(("", specials[k]))
            start = i + 1
    parts.append((text[start:], None))
    return [p for p in parts if p[0] or p[1]]
