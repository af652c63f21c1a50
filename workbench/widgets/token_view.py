"""TokenView: how a text is tokenized, one chip per token.

Chips show the readable token text (space ``·``, newline ``↵``, tab ``→``; bytes that are not UTF-8 on their own
as ``<0xEC>``, with the character they help spell underneath), the id, and on hover the exact bytes in hex and
the character span. Special tokens (``<BOS_TOKEN>``) are styled, never parsed: the text goes in via textContent.
Zero-width characters are named (``⟨ZWJ⟩``). The strip has a maximum height and scrolls; the selected token
(``selected``, linked with the other views by ``link_selection``) is scrolled into sight.
"""

from __future__ import annotations

from typing import Any, Sequence

import anywidget
import traitlets

from ._base import RecordCache, RecordsMixin, esm, resolve_ids, static_text, string_records
from .snapshot import SnapshotMixin, chips_html, snapshot_page


class TokenView(SnapshotMixin, RecordsMixin, anywidget.AnyWidget):
    """Tokens as chips with ids.

    Example::

        from workbench.widgets import TokenView
        TokenView(tok, "안녕하세요 👋 <b>hi</b>\\tx")      # display it (last expression of a cell)

    ``text_or_ids``: a string (encoded with ``tokenizer.encode``, so BOS is included), or token ids
    (list, ``[pos]`` / ``[1, pos]`` tensor). ``tokenizer=None`` with a list of strings shows those strings.
    """

    _esm = esm("token_view.js")
    _css = static_text("widgets.css")

    tokens_json = traitlets.Unicode("[]").tag(sync=True)      # committed records (see _base.token_records), JSON
    tail_json = traitlets.Unicode("[]").tag(sync=True)        # records from n_committed on (streaming), JSON
    n_committed = traitlets.Int(0).tag(sync=True)
    text = traitlets.Unicode("")                               # decoded text the spans index into (kernel only)
    frame = traitlets.Int(0).tag(sync=True)                    # streaming: number of the frame sent (the page
                                                               # answers {"rendered": n} once it has drawn it)
    frame_time = traitlets.Float(0.0).tag(sync=True)           # time.time() when that frame was sent
    title = traitlets.Unicode("").tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)                # token index clicked in the browser (-1: none)

    def __init__(self, tokenizer: Any = None, text_or_ids: Any = (), title: str = "", **kwargs: Any) -> None:
        super().__init__(title=title, **kwargs)
        self.tokenizer = tokenizer
        self._ids: list[int] = []
        self._cache = RecordCache(tokenizer)
        if tokenizer is None and isinstance(text_or_ids, (list, tuple)) and text_or_ids \
                and all(isinstance(t, str) for t in text_or_ids):
            self.tokens = string_records(text_or_ids)
            self.text = "".join(text_or_ids)
        else:
            self.set_ids(resolve_ids(tokenizer, text_or_ids))

    @property
    def ids(self) -> list[int]:
        """The token ids shown."""
        return list(self._ids)

    def set_ids(self, ids: Any) -> None:
        """Show these token ids instead (one message to the browser; only the changed tail when ``ids``
        extends what is shown)."""
        ids = resolve_ids(self.tokenizer, ids, "ids")
        records = self._cache.update(ids)
        self.show_records(records, self._cache.text, ids, self._cache.changed_from)

    def show_records(self, records: list[dict], text: str, ids: Sequence[int], changed_from: int = 0) -> None:
        """Show precomputed records (``RecordCache.update``) of ``ids``; records before ``changed_from`` are
        the ones already shown, so only the tail travels."""
        self._ids = [int(i) for i in ids]
        with self.hold_sync():
            self.text = text
            self.stream_records(records, changed_from)

    def append_ids(self, ids: Sequence[int]) -> None:
        """Add tokens at the end (streaming). Spans are recomputed over the whole sequence, because a character
        split across tokens is only decodable once its last byte has arrived."""
        self.set_ids(self._ids + resolve_ids(self.tokenizer, list(ids), "ids"))

    def to_html(self, full_page: bool = True) -> str:
        """Static, script-free HTML of the chips (token text escaped) for exports and READMEs."""
        body = (f"<div class='wb-root wb-snapshot'><div class='wb-head'><span class='wb-tokcount'>"
                f"{len(self.tokens)} tokens</span></div>{chips_html(self.tokens)}</div>")
        return snapshot_page(body, "TokenView", full_page)
