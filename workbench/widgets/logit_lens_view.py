"""LogitLensView: what each layer would predict, as a layers × positions grid.

Each cell is the top next-token prediction of the residual stream at (layer, position) read through the final
LayerNorm, the unembedding and ``logit_scale`` (``workbench.analysis.logit_lens``); colour = its probability;
hover lists the top-k. With ``target`` the cells are coloured by one token's probability instead, so you see at
which layer it appears. Positions are windowed (``window`` columns, ``pos_start`` pans) so long prompts stay light.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import anywidget
import torch
import traitlets

from ._base import (SnapshotMixin, blue, esc, esm, f16_bytes, i32_bytes, records_json, resolve_ids, snapshot_page,
                    static_text, token_records)


def resid_names(n_layers: int) -> list[str]:
    """The residual streams a logit lens reads: resid_pre of every layer, then the last resid_post."""
    return [f"blocks.{i}.hook_resid_pre" for i in range(n_layers)] + [f"blocks.{n_layers - 1}.hook_resid_post"]


def compute_lens(model: Any, cache_or_ids: Any, top_k: int, target: Any = None):
    """``(labels, top_ids [n_resid pos k], top_probs [n_resid pos k], target_probs [n_resid pos] | None)`` for
    batch row 0, from ``workbench.analysis.logit_lens`` (the shared, tested implementation: ln_final with each
    residual's own statistics, unembed, logit_scale). ``cache_or_ids``: input ids [1 pos], or an
    ``ActivationCache``/dict holding the ``resid_names`` tensors."""
    from workbench.activation_cache import ActivationCache
    from workbench.analysis import logit_lens

    if isinstance(cache_or_ids, Mapping) and not isinstance(cache_or_ids, ActivationCache):
        missing = [n for n in resid_names(model.cfg.n_layers) if n not in cache_or_ids]
        if missing:
            raise ValueError(f"logit lens needs {missing[0]} (and every resid_pre plus the last resid_post)")
        cache_or_ids = ActivationCache(dict(cache_or_ids), model)
    lens = logit_lens(model, cache_or_ids, top_k=top_k, target=None if target is None or target < 0 else target)
    target_probs = None if lens.target_prob is None else lens.target_prob[:, 0].float()
    return list(lens.labels), lens.top_ids[:, 0].long(), lens.top_probs[:, 0].float(), target_probs


@torch.no_grad()
def lens_step(model: Any, activations: Mapping[str, torch.Tensor], top_k: int, target: int = -1):
    """The lens of one generation step's new positions (batch row 0), as ``compute_lens`` returns it, in ONE
    ``workbench.analysis.lens_logits`` call over the stacked residuals ``[n_resid n d_model]`` (``logit_lens``
    loops over residuals, which costs a matmul launch per layer on every generated token)."""
    from workbench.analysis import lens_logits

    names = resid_names(model.cfg.n_layers)
    missing = [n for n in names if n not in activations]
    if missing:
        raise ValueError(f"logit lens needs {missing[0]} in the step's activations (capture every resid_pre "
                         "and the last resid_post)")
    stack = torch.stack([activations[n][0] for n in names])                  # [n_resid n d_model]
    probs = lens_logits(model, stack).float().softmax(-1)                      # [n_resid n vocab]
    top_probs, top_ids = probs.topk(top_k, dim=-1)
    target_probs = probs[..., target] if target >= 0 else None
    return top_ids, top_probs, target_probs


class LogitLensView(SnapshotMixin, anywidget.AnyWidget):
    """Logit lens grid for one prompt.

    Example::

        from workbench.widgets import LogitLensView
        LogitLensView(model, tok, "The Eiffel Tower is in the city of", top_k=5, target=" Paris")

    ``target``: a token id or a text that is exactly one token; cells are then coloured by its probability.
    """

    _esm = esm("logit_lens_view.js")
    _css = static_text("widgets.css")

    row_labels = traitlets.List(traitlets.Unicode()).tag(sync=True)   # "resid_pre 0" … "resid_post L-1"
    tokens_json = traitlets.Unicode("[]").tag(sync=True)              # input tokens of the shown positions (JSON)
    n_positions = traitlets.Int(0).tag(sync=True)
    k = traitlets.Int(5).tag(sync=True)
    window = traitlets.Int(24).tag(sync=True)                         # positions shown at once
    pos_start = traitlets.Int(0).tag(sync=True)
    positions = traitlets.List(traitlets.Int()).tag(sync=True)        # absolute positions of the columns
    top_ids = traitlets.Bytes(b"").tag(sync=True)                     # int32 [rows cols k]
    top_probs = traitlets.Bytes(b"").tag(sync=True)                   # float16 [rows cols k]
    id_text = traitlets.Dict().tag(sync=True)                         # str(id) -> readable token text
    target = traitlets.Int(-1).tag(sync=True)                         # tracked token id, -1 = none
    target_label = traitlets.Unicode("").tag(sync=True)
    target_text = traitlets.Unicode("").tag(sync=True)                # typed in the browser -> resolved here
    target_probs = traitlets.Bytes(b"").tag(sync=True)                # float16 [rows cols]
    error = traitlets.Unicode("").tag(sync=True)

    def __init__(self, model: Any = None, tokenizer: Any = None, text_or_ids: Any = None, top_k: int = 5,
                 target: Any = None, window: int = 24, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.model, self.tokenizer, self.follow = model, tokenizer, False
        self._ids: list[int] = []
        self._records: list[dict] = []
        self._top_ids = torch.zeros(0, 0, top_k, dtype=torch.long)     # [rows pos k]
        self._top_probs = torch.zeros(0, 0, top_k)
        self._target_probs: Optional[torch.Tensor] = None            # [rows pos]
        self._busy = False
        with self.hold_sync():
            self.k, self.window = int(top_k), int(window)
            target_id = self.resolve_target(target)
            if text_or_ids is not None:
                if model is None:
                    raise ValueError("text_or_ids given without model: LogitLensView needs the model to read")
                self._ids = resolve_ids(tokenizer, text_or_ids)
                input_ids = torch.tensor([self._ids], dtype=torch.long, device=getattr(model, "device", None))
                labels, top_ids, top_probs, target_probs = compute_lens(model, input_ids, self.k, target_id)
                self.row_labels = labels
                self._top_ids, self._top_probs, self._target_probs = top_ids.cpu(), top_probs.cpu(), \
                    None if target_probs is None else target_probs.cpu()
                self._records, _ = token_records(tokenizer, self._ids)
            elif model is not None:
                self.row_labels = [f"resid_pre {i}" for i in range(model.cfg.n_layers)] + \
                    [f"resid_post {model.cfg.n_layers - 1}"]
            self._set_target_trait(target_id)
            self._refresh()

    # ------------------------------------------------------------------------------------------- target
    def resolve_target(self, target: Any) -> int:
        """A token id (int) or a text that encodes to exactly one token -> its id; None -> -1."""
        if target is None or (isinstance(target, str) and target == ""):
            return -1
        if isinstance(target, bool):
            raise TypeError("target: expected a token id or a one-token text, got a bool")
        if isinstance(target, int) or (isinstance(target, torch.Tensor) and target.dim() == 0):
            target = int(target)
            vocab = getattr(getattr(self.model, "cfg", None), "vocab_size", None)
            if target < 0 or (vocab is not None and target >= vocab):
                raise ValueError(f"target: token id {target} is outside the vocabulary [0, {vocab})")
            return target
        if isinstance(target, str):
            if self.tokenizer is None:
                raise ValueError(f"target: {target!r} is text but there is no tokenizer; give a token id")
            try:
                ids = list(self.tokenizer.encode(target, add_special_tokens=False))
            except TypeError:
                ids = list(self.tokenizer.encode(target))
            if len(ids) != 1:
                raise ValueError(f"target: {target!r} is {len(ids)} tokens {ids}; give one token (its id or text)")
            return self.resolve_target(int(ids[0]))
        raise TypeError(f"target: expected a token id or a one-token text, got {type(target).__name__}")

    def set_target(self, target: Any) -> None:
        """Track ``target``'s probability (recomputes the lens for the shown tokens), or stop tracking (None)."""
        target_id = self.resolve_target(target)
        if target_id >= 0 and self._ids:
            if self.model is None:
                raise ValueError("set_target needs the model (this view was built without one)")
            input_ids = torch.tensor([self._ids], dtype=torch.long, device=getattr(self.model, "device", None))
            self._target_probs = compute_lens(self.model, input_ids, self.k, target_id)[3].cpu()
        else:
            self._target_probs = None
        with self.hold_sync():
            self._set_target_trait(target_id)
            self._refresh()

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
        self._target_probs = None
        with self.hold_sync():
            self._busy = True
            self.pos_start = 0
            self._busy = False
            self._refresh()

    def add_positions(self, top_ids: torch.Tensor, top_probs: torch.Tensor, target_probs: Optional[torch.Tensor],
                      ids: list[int]) -> None:
        """Append lens results [rows n k] for the newest n positions; ``ids`` is the whole sequence so far."""
        if self._top_ids.numel() == 0:
            self._top_ids, self._top_probs = top_ids.cpu(), top_probs.cpu().float()
        else:
            self._top_ids = torch.cat([self._top_ids, top_ids.cpu()], dim=1)
            self._top_probs = torch.cat([self._top_probs, top_probs.cpu().float()], dim=1)
        if target_probs is not None:
            tp = target_probs.cpu().float()
            self._target_probs = tp if self._target_probs is None else torch.cat([self._target_probs, tp], dim=1)
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

    @traitlets.observe("pos_start", "window")
    def _on_window(self, change: dict) -> None:
        if not self._busy:
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
                tp = self._target_probs
                self.target_probs = f16_bytes(tp[:, cols]) if tp is not None and self.target >= 0 else b""
        finally:
            self._busy = False

    # ------------------------------------------------------------------------------------------- data out
    def cells(self) -> list[list[dict]]:
        """The shown window as ``[row][col] -> {"position", "top": [(id, text, prob)...], "target_prob"}``."""
        texts = self._text_of(self._top_ids[:, self.pos_start: self.pos_start + len(self.positions)].flatten().tolist())
        out = []
        for r in range(len(self.row_labels)):
            row = []
            for c, pos in enumerate(self.positions):
                top = [(int(i), texts[str(int(i))], float(p))
                       for i, p in zip(self._top_ids[r, pos], self._top_probs[r, pos])]
                tp = None if self._target_probs is None or self.target < 0 else float(self._target_probs[r, pos])
                row.append({"position": pos, "top": top, "target_prob": tp})
            out.append(row)
        return out

    def to_html(self, full_page: bool = True) -> str:
        """Static snapshot of the shown window (escaped token text; the top-k in each cell's title)."""
        grid = self.cells()
        head = "<tr><th></th>" + "".join(
            f"<th>{esc(self.tokens[p]['text'] if p < len(self.tokens) else p)}<br>{p}</th>"
            for p in self.positions) + "</tr>"
        rows = []
        for label, row in zip(self.row_labels, grid):
            tds = []
            for cell in row:
                top_id, text, p = cell["top"][0]
                shade = cell["target_prob"] if cell["target_prob"] is not None else p
                title = "\n".join(f"{k + 1}. {t!r} {q:.3f}" for k, (_, t, q) in enumerate(cell["top"]))
                tds.append(f"<td class='wb-lens-cell' style='background:{blue(shade)};color:"
                           f"{'#fff' if shade > 0.55 else '#111'}' title='{esc(title)}'><span class='wb-text'>"
                           f"{esc(text)}</span><span class='wb-p'>{shade:.2f}</span></td>")
            rows.append(f"<tr><th class='wb-rowlabel'>{esc(label)}</th>{''.join(tds)}</tr>")
        tgt = f" · target {esc(repr(self.target_label))}" if self.target >= 0 else ""
        body = (f"<div class='wb-root wb-snapshot'><div class='wb-head'><span class='wb-title'>logit lens{tgt}"
                f"</span></div><table class='wb-lens'>{head}{''.join(rows)}</table></div>")
        return snapshot_page(body, "LogitLensView", full_page)
