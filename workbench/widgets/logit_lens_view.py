"""LogitLensView: what each layer would predict, as a layers × positions grid.

Each cell is the top next-token prediction of the residual stream at (layer, position) read through the final
LayerNorm, the unembedding and ``logit_scale`` (``workbench.analysis.logit_lens`` / ``lens_top``, the one
batched lens); colour = its probability; hover lists the top-k. The last layer's ``resid_post`` (the model's
output) is the TOP row: the stream flows upwards. With ``target`` the cells show that token's probability and
rank instead (the title names the token and its id; the top-1 stays in the tooltip), so you see at which layer
it appears; typing ``Rome`` offers the space-prefixed `` Rome`` when that is a token. Linear or log colour scale
with a colourbar. Positions are windowed (``window`` columns, ``pos_start`` pans) and cells shrink to fit the
notebook's width.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional

import anywidget
import torch
import traitlets

from ..analysis.logit_lens import lens_resid_names, lens_top, logit_lens
from ._base import esm, f16_bytes, i32_bytes, records_json, resolve_ids, static_text, token_records
from .snapshot import SnapshotMixin, blue, esc, fmt_value, ink, legend_html, snapshot_page


class LogitLensView(SnapshotMixin, anywidget.AnyWidget):
    """Logit lens grid for one prompt.

    Example::

        from workbench.widgets import LogitLensView
        LogitLensView(model, tok, "The Eiffel Tower is in the city of", top_k=5, target=" Paris")

    ``target``: a token id or a text that is exactly one token; cells then show its probability and rank.
    ``scale``: ``"linear"`` or ``"log"`` colours.
    """

    _esm = esm("logit_lens_view.js")
    _css = static_text("widgets.css")

    row_labels = traitlets.List(traitlets.Unicode()).tag(sync=True)   # "resid_pre 0" … "resid_post L-1"
    tokens_json = traitlets.Unicode("[]").tag(sync=True)              # input tokens of the shown positions (JSON)
    n_positions = traitlets.Int(0).tag(sync=True)
    k = traitlets.Int(5).tag(sync=True)
    window = traitlets.Int(16).tag(sync=True)                         # positions shown at once
    pos_start = traitlets.Int(0).tag(sync=True)
    positions = traitlets.List(traitlets.Int()).tag(sync=True)        # absolute positions of the columns
    top_ids = traitlets.Bytes(b"").tag(sync=True)                     # int32 [rows cols k]
    top_probs = traitlets.Bytes(b"").tag(sync=True)                   # float16 [rows cols k]
    id_text = traitlets.Dict().tag(sync=True)                         # str(id) -> readable token text
    target = traitlets.Int(-1).tag(sync=True)                         # tracked token id, -1 = none
    target_label = traitlets.Unicode("").tag(sync=True)
    target_text = traitlets.Unicode("").tag(sync=True)                # typed in the browser -> resolved here
    target_alt_json = traitlets.Unicode("").tag(sync=True)            # {"text", "label", "id"} offered instead
    target_probs = traitlets.Bytes(b"").tag(sync=True)                # float32 [rows cols] (tiny values stay)
    target_ranks = traitlets.Bytes(b"").tag(sync=True)                # int32 [rows cols], 0 = top
    scale = traitlets.Unicode("linear").tag(sync=True)                # linear | log
    selected = traitlets.Int(-1).tag(sync=True)                       # selected position (linked views)
    error = traitlets.Unicode("").tag(sync=True)

    def __init__(self, model: Any = None, tokenizer: Any = None, text_or_ids: Any = None, top_k: int = 5,
                 target: Any = None, window: int = 16, scale: str = "linear", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.model, self.tokenizer, self.follow = model, tokenizer, False
        self._ids: list[int] = []
        self._records: list[dict] = []
        self._top_ids = torch.zeros(0, 0, top_k, dtype=torch.long)     # [rows pos k]
        self._top_probs = torch.zeros(0, 0, top_k)
        self._target_probs: Optional[torch.Tensor] = None            # [rows pos]
        self._target_ranks: Optional[torch.Tensor] = None            # [rows pos]
        self._busy = False
        with self.hold_sync():
            self.k, self.window = int(top_k), int(window)
            self.set_scale(scale)
            target_id = self.resolve_target(target)
            if model is not None:
                self.row_labels = [f"resid_pre {i}" for i in range(model.cfg.n_layers)] + \
                    [f"resid_post {model.cfg.n_layers - 1}"]
            if text_or_ids is not None:
                if model is None:
                    raise ValueError("text_or_ids given without model: LogitLensView needs the model to read")
                self._ids = resolve_ids(tokenizer, text_or_ids)
                self._run(target_id)
                self._records, _ = token_records(tokenizer, self._ids)
            self._set_target_trait(target_id)
            self._refresh()

    def _run(self, target_id: int) -> None:
        """The lens of the whole prompt (``workbench.analysis.logit_lens``), batch row 0."""
        input_ids = torch.tensor([self._ids], dtype=torch.long, device=getattr(self.model, "device", None))
        lens = logit_lens(self.model, input_ids, top_k=self.k, target=target_id if target_id >= 0 else None)
        self.row_labels = list(lens.labels)
        self._top_ids, self._top_probs = lens.top_ids[:, 0].cpu().long(), lens.top_probs[:, 0].cpu().float()
        self._target_probs = None if lens.target_prob is None else lens.target_prob[:, 0].cpu().float()
        self._target_ranks = None if lens.target_rank is None else lens.target_rank[:, 0].cpu().long()

    # ------------------------------------------------------------------------------------------- target
    def resolve_target(self, target: Any) -> int:
        """A token id (int) or a text that encodes to exactly one token -> its id; None -> -1. For a text
        without a leading space, the space-prefixed token (`` Rome``, the usual mid-sentence form) is offered
        in ``target_alt_json`` when it is one token."""
        self.target_alt_json = ""
        if target is None or (isinstance(target, str) and target == ""):
            return -1
        if isinstance(target, bool):
            raise TypeError("target: expected a token id or a one-token text, got a bool")
        if isinstance(target, int) or (isinstance(target, torch.Tensor) and target.dim() == 0):
            return self._check_id(int(target))
        if not isinstance(target, str):
            raise TypeError(f"target: expected a token id or a one-token text, got {type(target).__name__}")
        if self.tokenizer is None:
            raise ValueError(f"target: {target!r} is text but there is no tokenizer; give a token id")
        ids = self._encode(target)
        alt = self._encode(" " + target) if not target.startswith((" ", "\n", "\t")) else []
        offer = ""
        if len(alt) == 1 and alt != ids:
            offer = json.dumps({"text": " " + target, "label": self._text_of(alt)[str(alt[0])], "id": alt[0]},
                               ensure_ascii=False)
        self.target_alt_json = offer
        if len(ids) != 1:
            hint = f"; ' {target}' is one token (id {alt[0]})" if len(alt) == 1 else ""
            raise ValueError(f"target: {target!r} is {len(ids)} tokens {ids}; give one token (its id or text)" + hint)
        return self._check_id(ids[0])

    def _check_id(self, target: int) -> int:
        vocab = getattr(getattr(self.model, "cfg", None), "vocab_size", None)
        if target < 0 or (vocab is not None and target >= vocab):
            raise ValueError(f"target: token id {target} is outside the vocabulary [0, {vocab})")
        return target

    def _encode(self, text: str) -> list[int]:
        try:
            return [int(i) for i in self.tokenizer.encode(text, add_special_tokens=False)]
        except TypeError:
            return [int(i) for i in self.tokenizer.encode(text)]

    def set_target(self, target: Any) -> None:
        """Track ``target``'s probability and rank (recomputes the lens for the shown tokens), or stop (None)."""
        target_id = self.resolve_target(target)
        alt = self.target_alt_json
        if target_id >= 0 and self._ids:
            if self.model is None:
                raise ValueError("set_target needs the model (this view was built without one)")
            n = self._top_ids.shape[1]
            ids, self._ids = self._ids, self._ids[:n]
            self._run(target_id)
            self._ids = ids
        else:
            self._target_probs = self._target_ranks = None
        with self.hold_sync():
            self._set_target_trait(target_id)
            self.target_alt_json = alt
            self._refresh()

    def set_scale(self, scale: str) -> None:
        """``"linear"`` or ``"log"`` colours (log: 1e-6 … 1)."""
        if scale not in ("linear", "log"):
            raise ValueError(f"scale={scale!r}: expected 'linear' or 'log'")
        self.scale = scale

    def _set_target_trait(self, target_id: int) -> None:
        self._busy = True
        try:
            self.target = target_id
            self.target_label = self._text_of([target_id])[str(target_id)] if target_id >= 0 else ""
        finally:
            self._busy = False

    @traitlets.observe("target_text")
    def _on_target_text(self, change: dict) -> None:
        if self._busy:
            return
        text = change["new"]
        try:
            value: Any = int(text) if text.strip().isdigit() else (text or None)
            self.set_target(value)
            self.error = ""
        except (ValueError, TypeError) as e:
            self.error = str(e)

    # ------------------------------------------------------------------------------------------- streaming
    def clear(self) -> None:
        """Forget every position (GenerationView starts each run empty)."""
        k = self.k
        self._ids, self._records = [], []
        self._top_ids, self._top_probs = torch.zeros(0, 0, k, dtype=torch.long), torch.zeros(0, 0, k)
        self._target_probs = self._target_ranks = None
        with self.hold_sync():
            self._busy = True
            self.pos_start = 0
            self._busy = False
            self._refresh()

    def add_step(self, activations: Mapping[str, torch.Tensor], ids: list[int]) -> None:
        """Append the lens of one generation step's new positions (batch row 0 of ``activations``, which hold
        every ``resid_pre`` and the last ``resid_post`` for those positions): ONE batched ``lens_top`` call.
        ``ids`` is the whole sequence so far. Shown at the next ``set_tokens``."""
        names = lens_resid_names(self.model.cfg.n_layers)
        missing = [n for n in names if n not in activations]
        if missing:
            raise ValueError(f"logit lens needs {missing[0]} in the step's activations (capture every resid_pre "
                             "and the last resid_post)")
        stack = torch.stack([activations[n][0] for n in names])             # [n_resid n d_model]
        target = self.target if self.target >= 0 else None
        top_ids, top_probs, t_prob, t_rank = lens_top(self.model, stack, self.k, target)
        self._top_ids = _cat(self._top_ids, top_ids.cpu().long())
        self._top_probs = _cat(self._top_probs, top_probs.cpu().float())
        if t_prob is not None:
            self._target_probs = _cat(self._target_probs, t_prob.cpu().float())
            self._target_ranks = _cat(self._target_ranks, t_rank.cpu().long())
        self._ids = list(ids)

    def set_tokens(self, records: list[dict]) -> None:
        """Position labels (input tokens); with ``follow`` the window jumps to the newest positions. Redraws."""
        with self.hold_sync():
            n = self._top_ids.shape[1]
            self._records = records[:n]
            if self.follow:
                self._busy = True
                self.pos_start = max(0, n - self.window)
                self._busy = False
            self._refresh()

    # ------------------------------------------------------------------------------------------- view state
    @property
    def tokens(self) -> list[dict]:
        """Records of the input tokens at every position (only the shown window is sent to the browser)."""
        return self._records

    def results(self) -> dict[str, Optional[torch.Tensor]]:
        """Everything computed so far: ``top_ids``/``top_probs`` [rows pos k], ``target_prob``/``target_rank``
        [rows pos] (None without a target)."""
        return {"top_ids": self._top_ids.clone(), "top_probs": self._top_probs.clone(),
                "target_prob": None if self._target_probs is None else self._target_probs.clone(),
                "target_rank": None if self._target_ranks is None else self._target_ranks.clone()}

    @traitlets.observe("pos_start", "window", "selected")
    def _on_window(self, change: dict) -> None:
        if self._busy:
            return
        if change["name"] == "selected":
            p, W = change["new"], self.window
            if 0 <= p < self._top_ids.shape[1] and not self.pos_start <= p < self.pos_start + W:
                self._busy = True
                self.pos_start = max(0, p - W // 2)
                self._busy = False
        self._refresh()

    def _text_of(self, ids) -> dict[str, str]:
        ids = sorted({int(i) for i in ids})
        if self.tokenizer is None:
            return {str(i): str(i) for i in ids}
        cache = self.__dict__.setdefault("_id_text_cache", {})    # a single token's text never changes
        new = [i for i in ids if i not in cache]
        if new:
            # Read one by one, a lone byte shows as <0xEC>: the honest reading of a single token.
            records, _ = token_records(self.tokenizer, new)
            cache.update({i: r["text"] for i, r in zip(new, records)})
        return {str(i): cache[i] for i in ids}

    def _refresh(self) -> None:
        n = self._top_ids.shape[1] if self._top_ids.dim() == 3 else 0
        self._busy = True
        try:
            with self.hold_sync():
                self.n_positions = n
                self.pos_start = min(max(self.pos_start, 0), max(0, n - self.window))
                cols = slice(self.pos_start, min(n, self.pos_start + self.window))
                ids = self._top_ids[:, cols]
                self.positions = list(range(cols.start, cols.stop))
                self.tokens_json = records_json(self._records[cols])
                self.top_ids = i32_bytes(ids)
                self.top_probs = f16_bytes(self._top_probs[:, cols])
                self.id_text = self._text_of(ids.flatten().tolist())
                tracking = self._target_probs is not None and self.target >= 0
                self.target_probs = self._target_probs[:, cols].float().contiguous().numpy().tobytes() \
                    if tracking else b""
                self.target_ranks = i32_bytes(self._target_ranks[:, cols]) if tracking else b""
        finally:
            self._busy = False

    # ------------------------------------------------------------------------------------------- data out
    def cells(self) -> list[list[dict]]:
        """The shown window as ``[row][col] -> {"position", "top": [(id, text, prob)...], "target_prob",
        "target_rank"}`` (row 0 = resid_pre 0; the browser draws the last row on top)."""
        texts = self._text_of(self._top_ids[:, self.pos_start: self.pos_start + len(self.positions)].flatten().tolist())
        tracking = self._target_probs is not None and self.target >= 0
        out = []
        for r in range(len(self.row_labels)):
            row = []
            for pos in self.positions:
                top = [(int(i), texts[str(int(i))], float(p))
                       for i, p in zip(self._top_ids[r, pos], self._top_probs[r, pos])]
                row.append({"position": pos, "top": top,
                            "target_prob": float(self._target_probs[r, pos]) if tracking else None,
                            "target_rank": int(self._target_ranks[r, pos]) if tracking else None})
            out.append(row)
        return out

    def to_html(self, full_page: bool = True) -> str:
        """Static snapshot of the shown window (escaped token text; the top-k in each cell's title), last layer
        on top as in the live view."""
        grid = self.cells()
        head = "<tr><th></th>" + "".join(
            f"<th>{esc(self.tokens[p]['text'] if p < len(self.tokens) else p)}<br>{p}</th>"
            for p in self.positions) + "</tr>"
        rows = []
        for label, row in reversed(list(zip(self.row_labels, grid))):
            tds = []
            for cell in row:
                top_id, text, p = cell["top"][0]
                tracking = cell["target_prob"] is not None
                shade = cell["target_prob"] if tracking else p
                title = "\n".join(f"{k + 1}. {t!r} {fmt_value(q)}" for k, (_, t, q) in enumerate(cell["top"]))
                first = f"#{cell['target_rank'] + 1}" if tracking else text
                tds.append(f"<td class='wb-lens-cell' style='background:{blue(shade)};color:{ink(shade)}' "
                           f"title='{esc(title)}'><span class='wb-text'>{esc(first)}</span>"
                           f"<span class='wb-p'>{fmt_value(shade)}</span></td>")
            rows.append(f"<tr><th class='wb-rowlabel'>{esc(label)}</th>{''.join(tds)}</tr>")
        tgt = (f" · p({esc(repr(self.target_label))}, id {self.target}) and its rank" if self.target >= 0 else "")
        body = (f"<div class='wb-root wb-snapshot'><div class='wb-head'><span class='wb-title'>logit lens{tgt}"
                f"</span></div>{legend_html(0.0, 1.0)}<table class='wb-lens'>{head}{''.join(rows)}</table></div>")
        return snapshot_page(body, "LogitLensView", full_page)


def _cat(old: Optional[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """Append along the position axis (dim 1); an empty or missing ``old`` is replaced."""
    return new if old is None or old.numel() == 0 else torch.cat([old, new], dim=1)
