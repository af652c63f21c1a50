"""CompareView: two prompts (clean vs corrupted) side by side, and their difference.

Both prompts are run once; the two AttentionViews and the difference view (corrupted − clean, a diverging
map from −1 to +1) share the layer, head, window, scale and selected query, so one click moves all three.

Example::

    from workbench.widgets import CompareView
    CompareView(model, tok, "When Mary and John went to the store, John gave a drink to",
                "When Mary and John went to the store, Mary gave a drink to", layer=2)
"""

from __future__ import annotations

from typing import Any

import ipywidgets as W
import torch
import traitlets

from ._base import resolve_ids
from .attention_view import AttentionView, pattern_filter
from .snapshot import esc, snapshot_page

SHARED = ("layer", "head", "q_start", "k_start", "window", "scale", "query")


class CompareView(W.VBox):
    """Attention of a clean and a corrupted prompt, side by side, and their difference.

    ``clean`` / ``corrupted``: strings or token ids. The difference view needs prompts of the same length
    (position-aligned, as in activation patching); otherwise it is left out and the view says why.
    """

    def __init__(self, model: Any, tokenizer: Any, clean: Any, corrupted: Any, layer: int = 0, head: int = 0,
                 window: int = 32, **kwargs: Any) -> None:
        ids = {}
        caches = {}
        for name, prompt in (("clean", clean), ("corrupted", corrupted)):
            ids[name] = resolve_ids(tokenizer, prompt, name)
            x = torch.tensor([ids[name]], dtype=torch.long, device=getattr(model, "device", None))
            _, caches[name] = model.run_with_cache(x, names_filter=pattern_filter, device="cpu")
        common = dict(tokenizer=tokenizer, layer=layer, head=head, window=window, **kwargs)
        self.clean = AttentionView(cache=caches["clean"], tokens=ids["clean"], **common)
        self.corrupted = AttentionView(cache=caches["corrupted"], tokens=ids["corrupted"], **common)
        self.diff = None
        self.note = W.Label("")
        views = [self.clean, self.corrupted]
        if len(ids["clean"]) == len(ids["corrupted"]):
            diff = {n: caches["corrupted"][n] - caches["clean"][n] for n in caches["clean"].keys()
                    if n.endswith("hook_pattern")}
            self.diff = AttentionView(cache=diff, tokens=ids["corrupted"], signed=True, **common)
            views.append(self.diff)
        else:
            self.note.value = (f"no difference view: the prompts have {len(ids['clean'])} and "
                               f"{len(ids['corrupted'])} tokens (position-aligned prompts are needed)")
        self._links = [traitlets.link((views[0], t), (v, t)) for v in views[1:] for t in SHARED]
        titled = [W.VBox([W.HTML("<b>clean</b>"), self.clean]), W.VBox([W.HTML("<b>corrupted</b>"), self.corrupted])]
        rest = [W.VBox([W.HTML("<b>difference: corrupted − clean</b>"), self.diff])] if self.diff else [self.note]
        super().__init__([W.HBox(titled, layout=W.Layout(flex_flow="row wrap", gap="16px"))] + rest)

    def to_html(self, full_page: bool = True) -> str:
        """Static snapshot: both views and the difference (each under its own size budget)."""
        parts = [("clean", self.clean), ("corrupted", self.corrupted)]
        if self.diff is not None:
            parts.append(("difference: corrupted − clean", self.diff))
        body = "".join(f"<div class='wb-root'><div class='wb-title'>{esc(t)}</div>{v.to_html(full_page=False)}</div>"
                       for t, v in parts)
        if self.note.value:
            body += f"<p>{esc(self.note.value)}</p>"
        return snapshot_page(body, "CompareView", full_page)
