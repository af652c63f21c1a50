"""Shared plumbing for the widgets: static assets, token ids from text, per-token display records, binary arrays.

Everything that reaches the browser goes through here: token text travels as JSON *strings* and is set with
``textContent`` in JS (never ``innerHTML``); number arrays travel as little-endian bytes (``float16``/``uint8``/
``int32``) with their shape in a separate trait, so a view sends only the slice it shows.
"""

from __future__ import annotations

import codecs
import json
from pathlib import Path
from typing import Any, Sequence

import torch

STATIC = Path(__file__).resolve().parent / "static"

# Raw whitespace that must never be invisible in a chip (TokenPiece.text already uses these markers;
# this is the fallback for tokenizers whose pieces carry raw text).
_VISIBLE = {" ": "·", "\n": "↵", "\t": "→", "\r": "␍",
            # zero-width and invisible format characters: named, or a chip would look empty
            "\u200b": "⟨ZWSP⟩", "\u200c": "⟨ZWNJ⟩", "\u200d": "⟨ZWJ⟩", "\u2060": "⟨WJ⟩",
            "\ufeff": "⟨BOM⟩", "\u00ad": "⟨SHY⟩", "\u200e": "⟨LRM⟩", "\u200f": "⟨RLM⟩", "\u034f": "⟨CGJ⟩"}


def static_text(*names: str) -> str:
    """The concatenated text of files in ``static/`` (plain ESM/CSS shipped with the package; no build, no CDN)."""
    return "\n".join((STATIC / name).read_text(encoding="utf-8") for name in names)


def esm(view_file: str) -> str:
    """A view's ES module: the shared helpers in ``_common.js`` followed by the view's own file.

    anywidget loads each module from a blob URL, where relative imports do not resolve, so the helpers are
    prepended as text instead of imported."""
    return static_text("_common.js", view_file)


def resolve_ids(tokenizer: Any, text_or_ids: Any, field: str = "text_or_ids") -> list[int]:
    """Token ids from a string (encoded with ``tokenizer``), a list of ints, or a 1-D / ``[1, pos]`` tensor."""
    if isinstance(text_or_ids, str):
        if tokenizer is None:
            raise ValueError(f"{field}: got a string but no tokenizer to encode it; pass tokenizer= or token ids")
        return [int(i) for i in tokenizer.encode(text_or_ids)]
    if isinstance(text_or_ids, torch.Tensor):
        t = text_or_ids.detach()
        if t.dim() == 2 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 1:
            raise ValueError(f"{field}: expected token ids of shape [pos] or [1, pos], got {tuple(t.shape)}")
        if t.dtype.is_floating_point:
            raise ValueError(f"{field}: expected integer token ids, got dtype {t.dtype}")
        return [int(i) for i in t.tolist()]
    if hasattr(text_or_ids, "tolist") and not isinstance(text_or_ids, (list, tuple)):  # numpy
        return resolve_ids(tokenizer, torch.as_tensor(text_or_ids.tolist()), field)
    if isinstance(text_or_ids, (list, tuple)):
        if len(text_or_ids) == 1 and isinstance(text_or_ids[0], (list, tuple)):
            text_or_ids = text_or_ids[0]
        if not all(isinstance(i, int) or (hasattr(i, "__index__") and not isinstance(i, bool))
                   for i in text_or_ids):
            raise ValueError(f"{field}: expected a string or a sequence of int token ids, got {text_or_ids!r:.80}")
        return [int(i) for i in text_or_ids]
    raise TypeError(f"{field}: expected a string, a list of token ids or a LongTensor, got {type(text_or_ids).__name__}")


def _field(piece: Any, name: str) -> Any:
    """``token_pieces`` may give objects with attributes or dicts (the contract allows both)."""
    if isinstance(piece, dict):  # plain dicts first: isinstance(x, Mapping) is slow in a per-token loop
        return piece[name]
    if hasattr(piece, name):
        return getattr(piece, name)
    return piece[name]


def visible(text: str) -> str:
    return "".join(_VISIBLE.get(c, c) for c in text)


def token_records(tokenizer: Any, ids: Sequence[int]) -> tuple[list[dict], str]:
    """Per-token display records and the decoded text their spans index into.

    Each record: ``id``; ``text`` (readable: visible whitespace, ``<0xEC>`` for bytes that are not UTF-8 on their
    own); ``hex`` (the token's exact bytes); ``start``/``end`` (character span in the decoded text; tokens that
    share a split character overlap); ``chars`` (that text); ``special``; ``partial`` (its bytes alone are not
    valid UTF-8, e.g. half of a Korean syllable or an emoji); ``newline`` (its bytes end a line).
    """
    records, data = _records_and_bytes(tokenizer, ids)
    return records, b"".join(data).decode("utf-8", errors="replace")


def _records_and_bytes(tokenizer: Any, ids: Sequence[int]) -> tuple[list[dict], list[bytes]]:
    ids = [int(i) for i in ids]
    if tokenizer is None:
        return [_bare_record(i) for i in ids], [b"" for _ in ids]
    if not hasattr(tokenizer, "token_pieces"):
        raise TypeError(f"tokenizer: {type(tokenizer).__name__} has no token_pieces(ids); "
                        "use workbench.Tokenizer (or pass tokens as strings)")
    pieces = tokenizer.token_pieces(ids)
    if len(pieces) != len(ids):
        raise ValueError(f"tokenizer.token_pieces returned {len(pieces)} pieces for {len(ids)} ids")
    data = [bytes(_field(p, "bytes")) for p in pieces]
    text = b"".join(data).decode("utf-8", errors="replace")  # the text the spans index into
    records = []
    for piece, raw in zip(pieces, data):
        start, end = (int(x) for x in _field(piece, "span"))
        try:
            raw.decode("utf-8")
            partial = False
        except UnicodeDecodeError:
            partial = True
        special = bool(_field(piece, "is_special"))
        shown = str(_field(piece, "text"))
        records.append({  # special tokens are shown verbatim; other tokens with visible whitespace
            "id": int(_field(piece, "id")), "text": shown if special else visible(shown), "hex": raw.hex(" "),
            "start": start, "end": end, "chars": text[start:end], "special": special,
            "partial": partial, "newline": raw.endswith(b"\n") and not special,
        })
    return records, data


class RecordCache:
    """``token_records`` for a growing sequence, recomputing only its tail.

    During generation the records of every earlier token stay the same except where a character's bytes are
    still arriving: a character is at most 4 bytes, so at most the last few tokens can change, and only if the
    bytes before them end mid-character. The tail is recomputed from a point where the earlier bytes end on a
    complete character (UTF-8 resynchronises there), and its spans are shifted by the characters before it.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.records: list[dict] = []
        self.data: list[bytes] = []
        self.changed_from = 0          # first index whose record changed in the last update()

    def update(self, ids: Sequence[int]) -> list[dict]:
        ids = [int(i) for i in ids]
        common = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            common += 1
        j = common
        prefix = b"".join(self.data[:j])
        while j > 0 and _ends_mid_character(prefix):
            j -= 1
            prefix = prefix[: len(prefix) - len(self.data[j])]
        tail, data = _records_and_bytes(self.tokenizer, ids[j:])
        shift = len(prefix.decode("utf-8", errors="replace"))
        for r in tail:
            r["start"] += shift
            r["end"] += shift
        records = self.records[:j] + tail
        same = j
        while same < min(len(self.records), len(records)) and self.records[same] == records[same]:
            same += 1                                     # recomputed but unchanged: not a change
        self.ids, self.records, self.data = ids, records, self.data[:j] + data
        self.changed_from = same
        return self.records

    @property
    def text(self) -> str:
        return b"".join(self.data).decode("utf-8", errors="replace")


def _ends_mid_character(data: bytes) -> bool:
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    decoder.decode(data[-4:], final=False)
    return bool(decoder.getstate()[0])


def records_json(records: Sequence[dict]) -> str:
    """Token records as ONE JSON string (parsed with JSON.parse in the browser, never evaluated as HTML).
    ipywidgets walks nested lists/dicts element by element looking for binary buffers before sending; for a
    500-token list of dicts that walk alone costs ~10 ms per view per update, one string costs nothing."""
    return json.dumps(list(records), ensure_ascii=False)


class RecordsMixin:
    """``view.tokens``: the token records, synced as a committed prefix (``tokens_json``) plus a tail
    (``tail_json``, the records from index ``n_committed`` on).

    ``set_records`` replaces everything (one message with the whole list); ``stream_records`` sends only the
    tail while it stays short, so a generation step costs the size of the new tokens, not of the sequence. The
    tail is folded into the prefix every ``TAIL_MAX`` tokens (and whenever a committed record changes).
    """

    TAIL_MAX = 128

    @property
    def tokens(self) -> list[dict]:
        return getattr(self, "_records", [])

    @tokens.setter
    def tokens(self, records: Sequence[dict]) -> None:
        self.set_records(list(records))

    def set_records(self, records: Sequence[dict], encoded: str | None = None) -> None:
        """Replace every record (``encoded``: ``records_json(records)`` if the caller has it already)."""
        self._records = list(records)
        with self.hold_sync():  # type: ignore[attr-defined]
            self.tokens_json = records_json(self._records) if encoded is None else encoded  # type: ignore
            self.tail_json = "[]"  # type: ignore[attr-defined]
            self.n_committed = len(self._records)  # type: ignore[attr-defined]

    def stream_records(self, records: Sequence[dict], changed_from: int) -> None:
        """The sequence grew or its last records changed from index ``changed_from``: send only the tail."""
        records = list(records)
        committed = int(self.n_committed)  # type: ignore[attr-defined]
        if changed_from < committed or len(records) < committed or len(records) - committed > self.TAIL_MAX:
            self.set_records(records)
            return
        self._records = records
        self.tail_json = records_json(records[committed:])  # type: ignore[attr-defined]


def _bare_record(i: int) -> dict:
    return {"id": i, "text": str(i), "hex": "", "start": 0, "end": 0, "chars": "", "special": False,
            "partial": False, "newline": False}


def string_records(tokens: Sequence[str]) -> list[dict]:
    """Records for tokens given as display strings (no tokenizer): id -1, text made visible."""
    out, offset = [], 0
    for t in tokens:
        if not isinstance(t, str):
            raise TypeError(f"tokens: expected strings (or ids with a tokenizer), got {type(t).__name__}")
        data = t.encode("utf-8")
        out.append({"id": -1, "text": visible(t), "hex": data.hex(" "), "start": offset, "end": offset + len(t),
                    "chars": t, "special": False, "partial": False, "newline": t.endswith("\n")})
        offset += len(t)
    return out


# --------------------------------------------------------------------------------------------- binary arrays
def f16_bytes(t: torch.Tensor) -> bytes:
    """Little-endian float16 bytes of a tensor (row-major). Attention weights and probabilities are in [0, 1],
    where float16 keeps ~3.3 significant digits: enough for a hover read-out, half the bytes of float32."""
    return t.detach().to("cpu", torch.float16).contiguous().numpy().tobytes()


def u8_bytes(t: torch.Tensor) -> bytes:
    """[0, 1] values as uint8 (round(255·x)): for thumbnails, where only the picture matters."""
    return (t.detach().float().clamp(0, 1) * 255 + 0.5).to("cpu", torch.uint8).contiguous().numpy().tobytes()


def i32_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu", torch.int32).contiguous().numpy().tobytes()


def from_f16(data: bytes, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``f16_bytes`` (used by tests and snapshots)."""
    import numpy as np

    return torch.from_numpy(np.frombuffer(data, dtype=np.float16).copy()).float().reshape(*shape)


def from_i32(data: bytes, shape: Sequence[int]) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.frombuffer(data, dtype=np.int32).copy()).long().reshape(*shape)


def from_u8(data: bytes, shape: Sequence[int]) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()).reshape(*shape)
