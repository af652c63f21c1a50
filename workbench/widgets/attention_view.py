"""AttentionView: where each head attends.

Layer and head selectors, a grid of head thumbnails, a heatmap of the selected ``[q_pos k_pos]`` pattern with
token labels on both axes (hover: query token, key token, weight), and the text coloured by the attention of a
selected query token.

What travels to the browser (binary, never the L×H×T×T tensor):

* the heatmap is **windowed**: at most ``window × window`` cells (``q_start``/``k_start`` pan), float16;
* thumbnails are **downsampled** by max-pooling each head's T×T pattern to at most ``thumb_size²`` uint8 pixels
  (max, not mean, so one sharp attention edge stays visible);
* the selected query's row over all T keys, float16.

So a 512- or 4096-token prompt costs the browser the same few kilobytes per update as a 40-token one.
"""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import anywidget
import torch
import torch.nn.functional as F
import traitlets

from ._base import (RecordsMixin, SnapshotMixin, blue, chips_html, esc, esm, f16_bytes, resolve_ids, snapshot_page, static_text,
                    string_records, token_records, u8_bytes)

_PATTERN = re.compile(r"^blocks\.(\d+)\.attn\.hook_pattern$")


def pattern_filter(name: str) -> bool:
    """``names_filter`` for ``run_with_cache`` that keeps only attention patterns."""
    return name.endswith("hook_pattern")


class AttentionView(SnapshotMixin, RecordsMixin, anywidget.AnyWidget):
    """Attention patterns of one prompt, one (layer, head) at a time.

    Example::

        from workbench.widgets import AttentionView
        AttentionView(model, tok, "The cat sat on the mat. The cat")          # runs the model once
        AttentionView(cache=cache, tokens=ids, tokenizer=tok, layer=2)         # from an existing run_with_cache

    ``cache`` is an ``ActivationCache`` (or dict) holding ``blocks.{i}.attn.hook_pattern`` [batch head q_pos k_pos]
    for one or more layers; ``tokens`` are the ids (with ``tokenizer``) or display strings of that prompt.
    """

    _esm = esm("attention_view.js")
    _css = static_text("widgets.css")

    tokens_json = traitlets.Unicode("[]").tag(sync=True)         # one record per position, as a JSON string
    n_tokens = traitlets.Int(0).tag(sync=True)                   # positions with patterns (labels may run one ahead)
    layers = traitlets.List(traitlets.Int()).tag(sync=True)      # layers whose patterns are available
    n_heads = traitlets.Int(0).tag(sync=True)
    layer = traitlets.Int(0).tag(sync=True)
    head = traitlets.Int(0).tag(sync=True)
    window = traitlets.Int(64).tag(sync=True)                    # heatmap shows at most window × window cells
    q_start = traitlets.Int(0).tag(sync=True)
    k_start = traitlets.Int(0).tag(sync=True)
    pattern = traitlets.Bytes(b"").tag(sync=True)                # float16 [n_q n_k], row-major
    pattern_shape = traitlets.List(traitlets.Int(), [0, 0]).tag(sync=True)
    thumbs = traitlets.Bytes(b"").tag(sync=True)                 # uint8 [head s s]
    thumb_size = traitlets.Int(0).tag(sync=True)                 # s
    query = traitlets.Int(-1).tag(sync=True)                     # selected query position, -1 = none
    query_row = traitlets.Bytes(b"").tag(sync=True)              # float16 [T]: weights of `query` over all keys

    def __init__(self, model: Any = None, tokenizer: Any = None, text_or_ids: Any = None, *, cache: Any = None,
                 tokens: Any = None, layer: int = 0, head: int = 0, window: int = 64, thumb_size: int = 32,
                 batch_index: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if window < 1 or thumb_size < 1:
            raise ValueError(f"window and thumb_size must be >= 1, got window={window}, thumb_size={thumb_size}")
        self.tokenizer, self._thumb_max, self.follow = tokenizer, int(thumb_size), False
        self._store: dict[int, torch.Tensor] = {}     # layer -> [head cap cap] float32 (rows beyond _n unused)
        self._n = 0
        self._thumbs_n = 0                             # T when the thumbnails were last computed
        self._busy = False
        with self.hold_sync():
            self.window = int(window)
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
                self.set_patterns(cache, tokens, batch_index=batch_index)
            self._select(layer, head)

    # ------------------------------------------------------------------------------------------- data in
    def set_patterns(self, cache: Mapping[str, torch.Tensor], tokens: Any, batch_index: int = 0) -> None:
        """Replace everything with the patterns in ``cache`` for the prompt ``tokens``."""
        records = self._records(tokens)
        T = len(records)
        found: dict[int, torch.Tensor] = {}
        for name in list(cache.keys()):
            m = _PATTERN.match(name)
            if not m:
                continue
            t = cache[name]
            if t.dim() != 4 or t.shape[2] != T or t.shape[3] != T:
                raise ValueError(f"{name}: expected a pattern of shape [batch, head, {T}, {T}] for {T} tokens, "
                                 f"got {tuple(t.shape)}")
            if not 0 <= batch_index < t.shape[0]:
                raise ValueError(f"batch_index={batch_index} out of range for {name} with batch {t.shape[0]}")
            found[int(m.group(1))] = t[batch_index].detach().to("cpu", torch.float32).clone()
        if not found:
            raise ValueError("cache holds no blocks.{i}.attn.hook_pattern; record them with "
                             "model.run_with_cache(ids, names_filter=lambda n: n.endswith('hook_pattern'))")
        heads = {t.shape[0] for t in found.values()}
        if len(heads) != 1:
            raise ValueError(f"patterns have different head counts across layers: {sorted(heads)}")
        self._store, self._n = dict(sorted(found.items())), T
        with self.hold_sync():
            self.n_tokens = T
            self.tokens = records
            self.n_heads = heads.pop()
            self.layers = list(self._store)
            self.query = -1
            self._select(self.layer if self.layer in self._store else self.layers[0], self.head)

    def _records(self, tokens: Any) -> list[dict]:
        if isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, str) for t in tokens):
            return string_records(tokens)
        if isinstance(tokens, (list, tuple)) and tokens and all(isinstance(t, Mapping) for t in tokens):
            return [dict(t) for t in tokens]
        records, _ = token_records(self.tokenizer, resolve_ids(self.tokenizer, tokens, "tokens"))
        return records

    def _reset_layers(self, layers: list[int], n_heads: int) -> None:
        """Start empty (used by GenerationView before the prefill)."""
        self._store = {layer: torch.zeros(n_heads, 0, 0) for layer in layers}
        self._n = self.n_tokens = 0
        with self.hold_sync():
            self.tokens, self.n_heads, self.layers, self.query = [], n_heads, list(layers), -1
            self._select(self.layer if self.layer in layers else layers[0], min(self.head, n_heads - 1))

    def add_rows(self, layer: int, pattern: torch.Tensor, positions: list[int]) -> None:
        """Store query rows ``pattern`` [head n k_pos] for absolute query ``positions`` (consecutive). The keys
        are the last k_pos positions up to the newest query (a KV cache's view, sliding windows included)."""
        if layer not in self._store:
            raise ValueError(f"layer {layer} is not one of this view's layers {list(self._store)}")
        if pattern.dim() != 3 or pattern.shape[1] != len(positions):
            raise ValueError(f"blocks.{layer}.attn.hook_pattern: expected [head, {len(positions)}, k_pos], "
                             f"got {tuple(pattern.shape)}")
        q0, q1 = positions[0], positions[-1] + 1
        if q1 - q0 != len(positions):
            raise ValueError(f"positions must be consecutive, got {positions[:8]}")
        k1 = q1
        k0 = k1 - pattern.shape[2]
        if k0 < 0:
            raise ValueError(f"blocks.{layer}.attn.hook_pattern has {pattern.shape[2]} keys for queries up to {q1 - 1}")
        store = self._grow(layer, k1)
        store[:, q0:q1, :] = 0
        store[:, q0:q1, k0:k1] = pattern.detach().to("cpu", torch.float32)
        self._n = max(self._n, k1)

    def _grow(self, layer: int, size: int) -> torch.Tensor:
        store = self._store[layer]
        if store.shape[1] < size:
            cap = max(size, 2 * store.shape[1], 16)
            grown = torch.zeros(store.shape[0], cap, cap)
            grown[:, : store.shape[1], : store.shape[2]] = store
            self._store[layer] = store = grown
        return store

    def set_tokens(self, records: list[dict], encoded: str | None = None) -> None:
        """Axis labels for the positions stored so far (GenerationView calls this every step), then redraw."""
        with self.hold_sync():
            self._set_records(records, encoded)
            self.n_tokens = self._n
            if self.follow:
                start = max(0, self._n - self.window)
                self._busy = True
                try:
                    self.q_start, self.k_start = start, start
                finally:
                    self._busy = False
            self._refresh(thumbs=None)

    # ------------------------------------------------------------------------------------------- view state
    def _select(self, layer: int, head: int) -> None:
        if self._store and layer not in self._store:
            raise ValueError(f"layer={layer}: patterns are available for layers {list(self._store)}")
        if self.n_heads and not 0 <= head < self.n_heads:
            raise ValueError(f"head={head}: expected 0 <= head < {self.n_heads}")
        with self.hold_sync():
            self._busy = True
            try:
                self.layer, self.head = int(layer), int(head)
            finally:
                self._busy = False
            self._refresh()

    @traitlets.observe("layer", "head", "q_start", "k_start", "window", "query")
    def _on_view_change(self, change: dict) -> None:
        if self._busy or not self._store:
            return
        if change["name"] == "layer" and change["new"] not in self._store:  # stale value from the browser
            self._busy = True
            self.layer = change["old"] if change["old"] in self._store else self.layers[0]
            self._busy = False
        self._refresh(thumbs=change["name"] in ("layer",))

    def _refresh(self, thumbs: Optional[bool] = True) -> None:
        """Re-slice what the browser shows. ``thumbs=None`` (streaming): redo the thumbnails only once at least
        one thumbnail pixel's worth of new rows (ceil(T / size)) arrived since the last time, so a long
        generation does not max-pool T² values per token for a picture that cannot have changed by a pixel."""
        if not self._store or self.layer not in self._store or self._n == 0:
            return
        T, W = self._n, max(1, self.window)
        full = self._store[self.layer]
        head = min(max(self.head, 0), full.shape[0] - 1)
        self._busy = True
        try:
            with self.hold_sync():
                self.q_start = min(max(self.q_start, 0), max(0, T - W))
                self.k_start = min(max(self.k_start, 0), max(0, T - W))
                block = full[head, self.q_start: min(T, self.q_start + W), self.k_start: min(T, self.k_start + W)]
                self.pattern = f16_bytes(block)
                self.pattern_shape = list(block.shape)
                s = min(T, self._thumb_max)
                stale = T - self._thumbs_n >= -(-T // s) or self.thumb_size != s
                if thumbs or not self.thumbs or (thumbs is None and stale):
                    self._thumbs_n = T
                    pooled = F.adaptive_max_pool2d(full[:, :T, :T][None], (s, s))[0] if T else full[:, :0, :0]
                    self.thumbs = u8_bytes(pooled)
                    self.thumb_size = s
                if 0 <= self.query < T:
                    self.query_row = f16_bytes(full[head, self.query, :T])
                else:
                    self.query_row = b""
        finally:
            self._busy = False

    # ------------------------------------------------------------------------------------------- data out
    def pattern_full(self, layer: Optional[int] = None, head: Optional[int] = None) -> torch.Tensor:
        """[q_pos k_pos] float32 of the stored pattern (not only the window)."""
        layer = self.layer if layer is None else layer
        head = self.head if head is None else head
        return self._store[layer][head, : self._n, : self._n].clone()

    def pattern_slice(self) -> torch.Tensor:
        """[n_q n_k] float32: the window the heatmap shows (before the float16 transfer)."""
        n_q, n_k = self.pattern_shape
        return self.pattern_full()[self.q_start: self.q_start + n_q, self.k_start: self.k_start + n_k]

    def to_html(self, full_page: bool = True) -> str:
        """Static snapshot: the windowed heatmap as a table (escaped labels, title tooltips) and, when a query is
        selected, the text coloured by its attention."""
        n_q, n_k = self.pattern_shape
        recs = self.tokens
        block = self.pattern_slice() if n_q and n_k else torch.zeros(0, 0)
        rows = ["<tr><th></th>" + "".join(
            f"<th class='wb-klabel'>{esc(recs[self.k_start + j]['text'])}</th>" for j in range(n_k)) + "</tr>"]
        for i in range(n_q):
            q = self.q_start + i
            cells = "".join(
                f"<td style='background:{blue(block[i, j])}' title='{esc(self._cell_title(q, self.k_start + j, block[i, j]))}'>"
                "</td>" for j in range(n_k))
            rows.append(f"<tr><th class='wb-qlabel'>{esc(recs[q]['text'])}</th>{cells}</tr>")
        text = ""
        if 0 <= self.query < self._n:
            text = ("<div class='wb-attn-text'>" +
                    chips_html(recs[: self._n], self.pattern_full()[self.query].tolist()) + "</div>")
        body = (f"<div class='wb-root wb-snapshot'><div class='wb-head'><span class='wb-title'>layer {self.layer} "
                f"head {self.head}</span><span class='wb-muted'>queries {self.q_start}–{self.q_start + n_q - 1}, keys "
                f"{self.k_start}–{self.k_start + n_k - 1} of {self._n}</span></div>"
                f"<table class='wb-heatmap'>{''.join(rows)}</table>{text}</div>")
        return snapshot_page(body, "AttentionView", full_page)

    def _cell_title(self, q: int, k: int, w: Any) -> str:
        return f"query {q} {self.tokens[q]['text']!r} → key {k} {self.tokens[k]['text']!r}: {float(w):.3f}"
