"""AttentionView: where each head attends.

A layer × head overview grid of clickable thumbnails (optionally ringed by head scores: previous-token,
induction, attention to BOS), a heatmap of the selected ``[q_pos k_pos]`` window with token labels on both
axes, a colourbar (linear / log / per-row-max), each row's weight outside the key window, a minimap of the
whole sequence (document/turn ``spans`` shaded, click to jump), and the text coloured by the selected query's
attention. PNG/SVG export buttons draw the view client-side.

What travels to the browser (binary, never the L×H×T×T tensor):

* the heatmap is **windowed**: at most ``window × window`` cells (``q_start``/``k_start`` pan), float16;
* thumbnails are **downsampled** by max-pooling each head's T×T pattern to at most ``thumb_size²`` uint8
  pixels, for at most ``overview_rows`` layers at a time (``overview_start`` pans);
* the selected query's row over all T keys and a ≤ 400-bin profile of the sequence, float16.

So a 512- or 4096-token prompt costs the browser the same few kilobytes per update as a 40-token one.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import anywidget
import torch
import traitlets

from ..hook_names import is_kind, layer_of
from ._base import (RecordsMixin, esm, f16_bytes, resolve_ids, static_text, string_records, token_records,
                    u8_bytes)
from ..analysis.attention_rows import attention_rows
from .attention_data import SCORE_NAMES, PatternStore, RowStore, check_spans, pool1d
from .snapshot import SnapshotMixin, chips_html, esc, heatmap_img, legend_html, snapshot_page

MINIMAP_BINS = 400
SCALES = ("linear", "log", "row")


def _bad_query(p: int, T: int) -> int:
    raise ValueError(f"queries: position {p} outside the {T} tokens")


def pattern_filter(name: str) -> bool:
    """``names_filter`` for ``run_with_cache`` that keeps only attention patterns."""
    return name.endswith("hook_pattern")


class AttentionView(SnapshotMixin, RecordsMixin, anywidget.AnyWidget):
    """Attention patterns of one prompt, one (layer, head) at a time, with an overview of every head.

    Example::

        from workbench.widgets import AttentionView
        AttentionView(model, tok, "The cat sat on the mat. The cat")          # runs the model once
        AttentionView(cache=cache, tokens=ids, tokenizer=tok, layer=2)         # from an existing run_with_cache
        AttentionView(model, tok, long_ids, spans=[("doc 1", 1, 400), ("doc 2", 400, 900)], score_by="BOS")

    ``cache`` is an ``ActivationCache`` (or dict) holding ``blocks.{i}.attn.hook_pattern`` [batch head q_pos k_pos]
    for one or more layers; ``tokens`` are the ids (with ``tokenizer``) or display strings of that prompt.
    ``spans``: ``(name, start, end)`` ranges shaded on the minimap. ``profile``: values per position [T] for the
    minimap instead of the attention received (e.g. rows from ``attention_rows``). ``head_scores``: ``{name:
    [n_layers n_heads]}`` to colour the overview by (default: computed from these patterns). ``signed=True``
    shows values in [-1, 1] with a diverging map (differences; see ``CompareView``).
    """

    _esm = esm("attention_view.js")
    _css = static_text("widgets.css")

    tokens_json = traitlets.Unicode("[]").tag(sync=True)         # committed records (JSON string)
    tail_json = traitlets.Unicode("[]").tag(sync=True)           # records from n_committed on (streaming)
    n_committed = traitlets.Int(0).tag(sync=True)
    n_tokens = traitlets.Int(0).tag(sync=True)                   # positions with patterns (labels may run one ahead)
    layers = traitlets.List(traitlets.Int()).tag(sync=True)      # layers whose patterns are available
    n_heads = traitlets.Int(0).tag(sync=True)
    layer = traitlets.Int(0).tag(sync=True)
    head = traitlets.Int(0).tag(sync=True)
    window = traitlets.Int(48).tag(sync=True)                    # heatmap shows at most window × window cells
    q_start = traitlets.Int(0).tag(sync=True)
    k_start = traitlets.Int(0).tag(sync=True)
    scale = traitlets.Unicode("linear").tag(sync=True)           # linear | log | row (per-row max)
    signed = traitlets.Bool(False).tag(sync=True)
    pattern = traitlets.Bytes(b"").tag(sync=True)                # float16 [n_q n_k], row-major
    pattern_shape = traitlets.List(traitlets.Int(), [0, 0]).tag(sync=True)
    outside = traitlets.Bytes(b"").tag(sync=True)                # float16 [n_q 2]: weight left/right of the keys
    thumbs = traitlets.Bytes(b"").tag(sync=True)                 # uint8 [overview layers, head, s, s]
    thumb_size = traitlets.Int(0).tag(sync=True)                 # s
    overview_layers = traitlets.List(traitlets.Int()).tag(sync=True)
    overview_start = traitlets.Int(0).tag(sync=True)             # index into layers of the first overview row
    overview_rows = traitlets.Int(6).tag(sync=True)
    head_scores_json = traitlets.Unicode("{}").tag(sync=True)    # {name: [[score per head] per layer]}
    score_by = traitlets.Unicode("").tag(sync=True)              # "" or one of the head score names
    query = traitlets.Int(-1).tag(sync=True)                     # selected query position, -1 = none
    query_row = traitlets.Bytes(b"").tag(sync=True)              # float16 [T]: weights of `query` over all keys
    minimap = traitlets.Bytes(b"").tag(sync=True)                # float16 [bins] profile of the whole sequence
    minimap_label = traitlets.Unicode("").tag(sync=True)
    spans_json = traitlets.Unicode("[]").tag(sync=True)          # [[name, start, end], ...]

    def __init__(self, model: Any = None, tokenizer: Any = None, text_or_ids: Any = None, *, cache: Any = None,
                 tokens: Any = None, layer: int = 0, head: int = 0, window: int = 48, thumb_size: int = 24,
                 batch_index: int = 0, spans: Any = None, profile: Any = None, head_scores: Any = None,
                 score_by: str = "", scale: str = "linear", signed: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if window < 1 or thumb_size < 1:
            raise ValueError(f"window and thumb_size must be >= 1, got window={window}, thumb_size={thumb_size}")
        self.tokenizer, self._thumb_max, self.follow = tokenizer, int(thumb_size), False
        self._data = PatternStore()
        self._ids: Optional[torch.Tensor] = None
        self._profile: Optional[torch.Tensor] = None
        self._given_scores = head_scores
        self._thumbs_n = 0                             # T when the thumbnails were last computed
        self._busy = False
        with self.hold_sync():
            self.window, self.signed = int(window), bool(signed)
            self.set_scale(scale)
            if text_or_ids is not None:
                if model is None:
                    raise ValueError("text_or_ids given without model: pass model= (or cache= and tokens=)")
                if cache is not None:
                    raise ValueError("give either text_or_ids (the model is run) or cache= + tokens=, not both")
                ids = resolve_ids(tokenizer, text_or_ids)
                input_ids = torch.tensor([ids], dtype=torch.long, device=getattr(model, "device", None))
                _, cache = model.run_with_cache(input_ids, names_filter=pattern_filter, device="cpu")
                tokens = ids
            if cache is not None:
                if tokens is None:
                    raise ValueError("cache= needs tokens= (the prompt's token ids or strings) for the axis labels")
                self.set_patterns(cache, tokens, batch_index=batch_index, spans=spans, profile=profile)
            if score_by and score_by not in SCORE_NAMES and score_by not in self.head_scores():
                raise ValueError(f"score_by={score_by!r}: expected one of {sorted(self.head_scores())}")
            self.score_by = score_by
            self._select(layer, head)

    # ------------------------------------------------------------------------------------------- data in
    def set_patterns(self, cache: Mapping[str, torch.Tensor], tokens: Any, batch_index: int = 0, spans: Any = None,
                     profile: Any = None) -> None:
        """Replace everything with the patterns in ``cache`` for the prompt ``tokens``."""
        records = self._records(tokens)
        T = len(records)
        found: dict[int, torch.Tensor] = {}
        for name in list(cache.keys()):
            if not is_kind(name, "pattern"):
                continue
            t = cache[name]
            if t.dim() != 4 or t.shape[2] != T or t.shape[3] != T:
                raise ValueError(f"{name}: expected a pattern of shape [batch, head, {T}, {T}] for {T} tokens, "
                                 f"got {tuple(t.shape)}")
            if not 0 <= batch_index < t.shape[0]:
                raise ValueError(f"batch_index={batch_index} out of range for {name} with batch {t.shape[0]}")
            found[layer_of(name)] = t[batch_index].detach().to("cpu", torch.float32).clone()
        if not found:
            raise ValueError("cache holds no blocks.{i}.attn.hook_pattern; record them with "
                             "model.run_with_cache(ids, names_filter=lambda n: n.endswith('hook_pattern'))")
        heads = {t.shape[0] for t in found.values()}
        if len(heads) != 1:
            raise ValueError(f"patterns have different head counts across layers: {sorted(heads)}")
        if profile is not None:
            profile = torch.as_tensor(profile, dtype=torch.float32).reshape(-1)
            if profile.numel() != T:
                raise ValueError(f"profile: expected one value per position ({T}), got {profile.numel()}")
        self._install(PatternStore(found, T), records, heads.pop(), spans, profile)

    def _install(self, store: PatternStore, records: list, n_heads: int, spans: Any, profile: Any) -> None:
        T = store.n
        spans_list = check_spans(spans, T)
        self._data = store
        self._ids = torch.tensor([r["id"] for r in records]) if all(r["id"] >= 0 for r in records) else None
        self._profile = profile
        self._thumbs_n = 0
        with self.hold_sync():
            self.n_tokens = T
            self.tokens = records
            self.n_heads = n_heads
            self.layers = list(self._data.layers)
            self.spans_json = json.dumps(spans_list, ensure_ascii=False)
            self.query = -1
            self._update_scores()
            self._select(self.layer if self.layer in self._data.layers else self.layers[0], self.head)

    # ----------------------------------------------------------------------- ragwire: long prompts from rows
    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, text_or_ids: Any, *, query: Optional[int] = None, queries: Any = None,
                   layers: Any = None, spans: Any = None, layer: Optional[int] = None, head: int = 0,
                   window: int = 48, **kwargs: Any) -> "AttentionView":
        """A view of a long prompt from exact attention rows (``attention_rows``: one forward, memory
        O(rows x T), never a ``T x T`` pattern). ``queries``: the positions whose rows are computed (default
        the last ``window``, or ``window`` around ``query``, a position selected at the start, negative from
        the end); the heatmap, thumbnails, head scores and the
        minimap (the selected query's row, or the attention each key receives from the computed queries) all
        come from those rows. ``spans``: ``(name, start, end)`` ranges, e.g. ``spans_from_chat``'s, shaded on
        the minimap.

        Example::

            ids, spans = spans_from_chat(tok, messages, documents=docs)
            AttentionView.from_model(model, tok, ids, query=-1, spans=spans, layers=[0, 1])
        """
        ids = resolve_ids(tokenizer, text_or_ids)
        T = len(ids)
        if T == 0:
            raise ValueError("text_or_ids: the prompt is empty")
        if query is not None and not -T <= query < T:
            raise ValueError(f"query={query}: expected a position in [-{T}, {T})")
        q = None if query is None else query % T
        if queries is None:
            start = max(0, T - window) if q is None else min(max(0, q - window // 2), max(0, T - window))
            queries = range(start, min(T, start + window))
        queries = sorted({p % T if -T <= p < T else _bad_query(p, T) for p in queries})
        if not queries or queries != list(range(queries[0], queries[-1] + 1)):
            raise ValueError(f"queries: expected consecutive positions, got {queries[:8]}...")
        input_ids = torch.tensor([ids], dtype=torch.long, device=getattr(model, "device", None))
        rows = attention_rows(model, input_ids, layers=layers, queries=queries)         # {layer: [1 head n_q T]}
        view = cls(tokenizer=tokenizer, window=window, **kwargs)
        store = RowStore({k: v[0] for k, v in rows.items()}, queries[0], T)
        with view.hold_sync():
            view._install(store, view._records(ids), store.n_heads, spans, None)
            view._busy = True
            view.q_start, view.k_start = min(queries[0], max(0, T - window)), min(queries[0], max(0, T - window))
            view._busy = False
            view._select(layer if layer is not None else next(iter(store.layers)), head)
            if q is not None:
                if q not in queries:
                    raise ValueError(f"query={query}: not among the computed queries {queries[0]}..{queries[-1]}")
                view.query = q
        return view

    def _records(self, tokens: Any) -> list[dict]:
        if isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, str) for t in tokens):
            return string_records(tokens)
        if isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, Mapping) for t in tokens):
            return [dict(t) for t in tokens]
        records, _ = token_records(self.tokenizer, resolve_ids(self.tokenizer, tokens, "tokens"))
        return records

    def reset(self, layers: list[int], n_heads: int) -> None:
        """Start empty, for patterns that will arrive row by row (``add_rows``; GenerationView does this)."""
        self._data = PatternStore.empty(layers, n_heads)
        self._ids, self._profile, self._thumbs_n = None, None, 0
        with self.hold_sync():
            self.n_tokens = 0
            self.tokens, self.n_heads, self.layers, self.query = [], n_heads, list(layers), -1
            self.head_scores_json = "{}"
            self._select(self.layer if self.layer in layers else layers[0], min(self.head, n_heads - 1))

    def add_rows(self, layer: int, pattern: torch.Tensor, positions: list[int]) -> None:
        """Store query rows ``pattern`` [head n k_pos] for absolute query ``positions`` (consecutive); shown at
        the next ``set_tokens``."""
        self._data.add_rows(layer, pattern, positions)

    def set_tokens(self, records: list[dict], changed_from: int = 0, scores: bool = False) -> None:
        """Axis labels for the positions stored so far (GenerationView calls this once per frame), then redraw.
        ``changed_from``: records before it are already shown (only the tail is sent)."""
        with self.hold_sync():
            self.stream_records(records, changed_from)
            self._ids = torch.tensor([r["id"] for r in records]) if all(r["id"] >= 0 for r in records) else None
            self.n_tokens = self._data.n
            if self.follow:
                start = max(0, self._data.n - self.window)
                self._busy = True
                try:
                    self.q_start, self.k_start = start, start
                finally:
                    self._busy = False
            if scores:
                self._update_scores()
            self._refresh(thumbs=None)

    def set_scale(self, scale: str) -> None:
        """Colour scale: ``"linear"``, ``"log"`` or ``"row"`` (each row divided by its maximum)."""
        if scale not in SCALES:
            raise ValueError(f"scale={scale!r}: expected one of {SCALES}")
        self.scale = scale

    def head_scores(self) -> dict[str, torch.Tensor]:
        """``{name: [n_layers_stored n_heads]}``: the scores the overview can be coloured by."""
        return {k: torch.tensor(v) for k, v in json.loads(self.head_scores_json).items()}

    def _update_scores(self) -> None:
        if not self._data.layers or self._data.n == 0:
            return
        scores = self._data.head_scores(self._ids)
        for name, value in (self._given_scores or {}).items():
            value = torch.as_tensor(value, dtype=torch.float32)
            if value.dim() != 2 or value.shape[1] != self._data.n_heads:
                raise ValueError(f"head_scores[{name!r}]: expected [n_layers, {self._data.n_heads}], got "
                                 f"{tuple(value.shape)}")
            scores[str(name)] = [value[layer].tolist() for layer in self._data.layers]
        self.head_scores_json = json.dumps(scores)

    # ------------------------------------------------------------------------------------------- view state
    def select(self, layer: Optional[int] = None, head: Optional[int] = None, query: Optional[int] = None) -> None:
        """Show (layer, head) and/or select a query position (-1: none); the window pans to the query."""
        with self.hold_sync():
            self._select(self.layer if layer is None else layer, self.head if head is None else head)
            if query is not None:
                self.query = int(query)

    def _select(self, layer: int, head: int) -> None:
        if self._data.layers and layer not in self._data.layers:
            raise ValueError(f"layer={layer}: patterns are available for layers {list(self._data.layers)}")
        if self.n_heads and not 0 <= head < self.n_heads:
            raise ValueError(f"head={head}: expected 0 <= head < {self.n_heads}")
        with self.hold_sync():
            self._busy = True
            try:
                self.layer, self.head = int(layer), int(head)
            finally:
                self._busy = False
            self._refresh()

    @traitlets.observe("layer", "head", "q_start", "k_start", "window", "query", "overview_start", "overview_rows")
    def _on_view_change(self, change: dict) -> None:
        if self._busy or not self._data.layers:
            return
        if change["name"] == "layer" and change["new"] not in self._data.layers:  # stale value from the browser
            self._busy = True
            self.layer = change["old"] if change["old"] in self._data.layers else self.layers[0]
            self._busy = False
        if change["name"] == "query":
            self._pan_to(change["new"])
        self._refresh(thumbs=change["name"] in ("overview_start", "overview_rows"))

    def _pan_to(self, q: int) -> None:
        """Move the window so that query ``q`` is inside it (centred when it was outside)."""
        W, T = max(1, self.window), self._data.n
        if not 0 <= q < T or self.q_start <= q < self.q_start + W:
            return
        start = min(max(0, q - W // 2), max(0, T - W))
        self._busy = True
        try:
            self.q_start = start
            if not self.k_start <= q < self.k_start + W:
                self.k_start = start
        finally:
            self._busy = False

    def _refresh(self, thumbs: Optional[bool] = True) -> None:
        """Re-slice what the browser shows. ``thumbs=None`` (streaming): redo the thumbnails only once at least
        one thumbnail pixel's worth of new rows (ceil(T / size)) arrived since the last time."""
        data = self._data
        if not data.layers or self.layer not in data.layers or data.n == 0:
            return
        T, W = data.n, max(1, self.window)
        head = min(max(self.head, 0), data.n_heads - 1)
        self._busy = True
        try:
            with self.hold_sync():
                self.q_start = min(max(self.q_start, 0), max(0, T - W))
                self.k_start = min(max(self.k_start, 0), max(0, T - W), self.q_start + W - 1)
                block = data.window(self.layer, head, self.q_start, self.k_start, W)
                self.pattern = f16_bytes(block)
                self.pattern_shape = list(block.shape)
                self.outside = f16_bytes(data.outside(self.layer, head, self.q_start, block.shape[0],
                                                      self.k_start, block.shape[1]))
                self._refresh_thumbs(thumbs)
                self.query_row = f16_bytes(data.row(self.layer, head, self.query)) if 0 <= self.query < T else b""
                self._refresh_minimap(head)
        finally:
            self._busy = False

    def _refresh_thumbs(self, thumbs: Optional[bool]) -> None:
        data, T = self._data, self._data.n
        layers = list(data.layers)
        rows = max(1, self.overview_rows)
        start = min(max(0, self.overview_start), max(0, len(layers) - rows))
        if self.layer in layers and not start <= layers.index(self.layer) < start + rows:
            start = min(layers.index(self.layer), max(0, len(layers) - rows))
        shown = layers[start: start + rows]
        s = min(T, self._thumb_max)
        stale = T - self._thumbs_n >= -(-T // s) or self.thumb_size != s or shown != self.overview_layers
        if thumbs or not self.thumbs or (thumbs is None and stale) or shown != self.overview_layers:
            self._thumbs_n = T
            self.overview_start = start
            self.overview_layers = shown
            self.thumbs = u8_bytes(data.thumbnails(shown, s, magnitude=self.signed))
            self.thumb_size = s

    def _refresh_minimap(self, head: int) -> None:
        if self._profile is not None and not 0 <= self.query < self._data.n:
            from_profile = self._profile[: self._data.n]
            values = from_profile.abs().max().clamp(min=1e-12)
            self.minimap = f16_bytes(pool1d(from_profile / values, MINIMAP_BINS))
            self.minimap_label = "given profile (scaled to its maximum)"
            return
        self.minimap = f16_bytes(self._data.profile(self.layer, head, self.query, MINIMAP_BINS))
        self.minimap_label = (f"attention of query {self.query}" if 0 <= self.query < self._data.n
                              else "attention received per key (mean over queries)")
        if isinstance(self._data, RowStore):
            self.minimap_label += f"; rows computed for queries {self._data.q0}–{self._data.q1 - 1} only"

    # ------------------------------------------------------------------------------------------- data out
    def pattern_full(self, layer: Optional[int] = None, head: Optional[int] = None) -> torch.Tensor:
        """[q_pos k_pos] float32 of the stored pattern (not only the window)."""
        layer = self.layer if layer is None else layer
        head = self.head if head is None else head
        return self._data.full(layer)[head].clone()

    def pattern_slice(self) -> torch.Tensor:
        """[n_q n_k] float32: the window the heatmap shows (before the float16 transfer)."""
        n_q, n_k = self.pattern_shape
        block = self._data.window(self.layer, self.head, self.q_start, self.k_start, max(n_q, n_k))
        return block[:n_q, :n_k].clone()

    def to_html(self, full_page: bool = True) -> str:
        """Static snapshot under 64 KiB: the window as one PNG (max-pooled if large; the caption says so) with
        escaped labels, a colourbar, and, when a query is selected, the text coloured by its attention."""
        n_q, n_k = self.pattern_shape
        recs = self.tokens
        block = self.pattern_slice() if n_q and n_k else torch.zeros(0, 0)
        if self.scale == "row" and block.numel():
            block = block / block.abs().amax(-1, keepdim=True).clamp(min=1e-12)
        lo, hi = (-1.0, 1.0) if self.signed else (0.0, 1.0)
        img, note = heatmap_img(block, 12, self.signed, f"layer {self.layer} head {self.head}") if block.numel() \
            else ("", "")
        labels = lambda start, n: "".join(  # noqa: E731
            f"<span class='wb-snap-label'>{esc(recs[start + i]['text'])}</span>" for i in range(min(n, 64)))
        text = ""
        if 0 <= self.query < self._data.n:
            text = ("<div class='wb-attn-text'>" +
                    chips_html(recs[: self._data.n], self._data.row(self.layer, self.head, self.query).tolist(),
                               budget=24 * 1024)
                    + "</div>")
        body = (f"<div class='wb-root wb-snapshot'><div class='wb-head'><span class='wb-title'>layer {self.layer} "
                f"head {self.head}</span><span class='wb-muted'>queries {self.q_start}–{self.q_start + n_q - 1}, "
                f"keys {self.k_start}–{self.k_start + n_k - 1} of {self._data.n}</span></div>"
                + legend_html(lo, hi, self.signed, "per-row max" if self.scale == "row" else "linear")
                + f"<div class='wb-snap-heatwrap'>{img}</div>"
                + (f"<div class='wb-muted wb-snap-note'>{esc(note)}</div>" if note else "")
                + f"<div class='wb-muted wb-snap-labels'>queries: {labels(self.q_start, n_q)}</div>"
                + f"<div class='wb-muted wb-snap-labels'>keys: {labels(self.k_start, n_k)}</div>{text}</div>")
        return snapshot_page(body, "AttentionView", full_page)

