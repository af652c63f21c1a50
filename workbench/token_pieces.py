"""Tokens prepared for display: exact bytes, a readable rendering and the character span each token
contributes to the decoded text (a character split across byte tokens is shared by them).

Example::

    readable(b" the\n")        # '·the↵'
    readable(b"\xec\x9d")      # '<0xEC><0x9D>' (not complete UTF-8 on its own)
"""

from __future__ import annotations

import dataclasses
import unicodedata

__all__ = ["TokenPiece", "readable", "utf8_segments"]

_VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍"}


@dataclasses.dataclass(frozen=True)
class TokenPiece:
    """One token prepared for display.

    ``bytes`` are the token's exact bytes; ``text`` is a readable rendering (space ``·``, newline ``↵``, tab ``→``,
    bytes that are not complete UTF-8 on their own as ``<0xEC>``); ``span`` is the ``[start, end)`` character range
    of the decoded text the token contributes to: tokens sharing a character split across them share that character.
    """

    id: int
    token: str | None  # the raw vocabulary string ('Ġthe'), None for an id outside the vocabulary
    bytes: bytes
    text: str
    is_special: bool  # added/control token (rendered from its content, not from byte-level BPE)
    span: tuple[int, int]


def utf8_segments(data: bytes) -> list[tuple[bytes, str | None]]:
    """Split ``data`` into valid UTF-8 runs (with their text) and invalid runs (``None``). Each invalid run is one
    maximal ill-formed subpart, i.e. exactly one U+FFFD in ``data.decode("utf-8", "replace")``."""
    segments: list[tuple[bytes, str | None]] = []
    rest = data
    while rest:
        try:
            segments.append((rest, rest.decode("utf-8")))
            break
        except UnicodeDecodeError as e:
            if e.start:
                segments.append((rest[: e.start], rest[: e.start].decode("utf-8")))
            segments.append((rest[e.start : e.end], None))
            rest = rest[e.end :]
    return segments


def _visible(ch: str) -> str:
    category = unicodedata.category(ch)
    if ch in _VISIBLE:
        return _VISIBLE[ch]
    if category == "Cc":
        return f"<0x{ord(ch):02X}>"
    # zero-width characters and exotic spaces would be invisible, or look like a plain space
    return f"<U+{ord(ch):04X}>" if category in ("Cf", "Zl", "Zp", "Zs") else ch


def readable(data: bytes) -> str:
    """Readable text of token bytes: space ``·``, newline ``↵``, tab ``→``, invalid UTF-8 bytes as ``<0xEC>``."""
    return "".join("".join(f"<0x{b:02X}>" for b in raw) if text is None else "".join(map(_visible, text))
                   for raw, text in utf8_segments(data))
