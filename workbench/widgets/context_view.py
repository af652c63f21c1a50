"""ContextView: a grounded answer span by span, the documents ranked by each attribution method, and the
model's own citations beside them.

Hover or click a span of the reply: the documents are listed with, per method, their rank and score (the
selected method's scores shade the rows), a "cited" mark where the span's ``<co: ...>`` markup cites the
document, and a warning where a method's top document is not one the span cites. ``to_html()`` gives the
same for every span as a static, script-free page.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

import anywidget
import traitlets

from ._base import static_text
from .snapshot import SnapshotMixin, esc, snapshot_page


def _results(results: Any) -> list:
    items = list(results) if isinstance(results, (list, tuple)) else [results]
    if not items:
        raise ValueError("results: expected a ContextAttribution or a non-empty list of them")
    first = items[0]
    for i, r in enumerate(items):
        for name in ("method", "scores", "spans", "documents", "model_citations", "response"):
            if not hasattr(r, name):
                raise TypeError(f"results[{i}]: expected a ContextAttribution (from context_attribution), "
                                f"got {type(r).__name__} without .{name}")
        if r.response != first.response or [(s.start, s.end) for s in r.spans] != [(s.start, s.end) for s in first.spans]:
            raise ValueError(f"results[{i}] ({r.method}): a different reply or different spans than results[0]; "
                             "compute every method on the same response and spans")
        if len(r.documents) != len(first.documents):
            raise ValueError(f"results[{i}] ({r.method}): {len(r.documents)} documents, results[0] has {len(first.documents)}")
    methods = [r.method for r in items]
    if len(set(methods)) != len(methods):
        raise ValueError(f"results: one result per method expected, got methods {methods}")
    return items


def view_data(results: Sequence) -> dict:
    """The JSON the view draws: reply, spans, documents, per-method scores / rankings, citations, disagreements."""
    first = results[0]
    cites = first.model_citations.bool()
    methods = {}
    for r in results:
        scores = r.scores.float()
        top = scores.argmax(dim=1)
        methods[r.method] = {
            "scores": [[round(float(x), 5) for x in row] for row in scores],
            "ranks": [[int(i) for i in row.argsort(descending=True)] for row in scores],
            "disagree": [bool(cites[s].any()) and not bool(cites[s, top[s]]) for s in range(len(first.spans))],
        }
    docs = [{"index": i, "title": str(d.get("title", "")), "text": " ".join(f"{v}" for k, v in d.items() if k != "title")}
            for i, d in enumerate(first.documents)]
    return {"response": first.response,
            "spans": [{"text": s.text, "start": s.start, "end": s.end, "label": s.label,
                       "token_start": s.token_start, "token_end": s.token_end} for s in first.spans],
            "prompt_length": len(getattr(first, "prompt_ids", ())),
            "documents": docs, "methods": methods, "order": [r.method for r in results],
            "citations": [[bool(x) for x in row] for row in cites]}


class ContextView(SnapshotMixin, anywidget.AnyWidget):
    """Spans of a grounded reply against its documents, for one or several attribution methods.

    Example::

        from workbench.analysis import context_attribution
        from workbench.widgets import ContextView
        results = [context_attribution(model, tok, messages, docs, response=reply, method=m)
                   for m in ("ablation", "attention", "gradient")]
        ContextView(results)                      # display it; hover a span
        link_selection(ContextView(results), TokenView(tok, results[0].prompt_ids + results[0].response_ids))
    """

    _esm = static_text("context_view.js")
    _css = static_text("context_view.css")

    data_json = traitlets.Unicode("{}").tag(sync=True)
    method = traitlets.Unicode("").tag(sync=True)         # the method that shades the document rows
    selected = traitlets.Int(-1).tag(sync=True)           # span clicked (-1: none)
    position = traitlets.Int(-1).tag(sync=True)           # the selected span's first token in prompt + reply ids
    title = traitlets.Unicode("").tag(sync=True)

    def __init__(self, results: Any, title: str = "", **kwargs: Any) -> None:
        items = _results(results)
        super().__init__(title=title, method=items[0].method, **kwargs)
        self.results = items
        self.data = view_data(items)
        self.data_json = json.dumps(self.data, ensure_ascii=False)
        self._linking = False

    # ------------------------------------------------------------------ ragwire: linked selection
    # ``position`` is what ``link_selection`` links: selecting a span selects its first token (prompt + reply
    # ids) in a TokenView / AttentionView of those ids; selecting a token there selects the span holding it.
    def span_at(self, position: int) -> int:
        """The span holding token ``position`` of prompt + reply ids (-1: none)."""
        p = position - self.data["prompt_length"]
        return next((i for i, s in enumerate(self.data["spans"]) if s["token_start"] <= p < s["token_end"]), -1)

    @traitlets.observe("selected")
    def _selected_changed(self, change: dict) -> None:
        if self._linking:
            return
        s = change["new"]
        spans = self.data["spans"]
        self._linking = True
        try:
            self.position = self.data["prompt_length"] + spans[s]["token_start"] if 0 <= s < len(spans) else -1
        finally:
            self._linking = False

    @traitlets.observe("position")
    def _position_changed(self, change: dict) -> None:
        if self._linking:
            return
        self._linking = True
        try:
            self.selected = self.span_at(change["new"]) if change["new"] >= 0 else -1
        finally:
            self._linking = False

    def _span_html(self, s: int) -> str:
        d = self.data
        span = d["spans"][s]
        cited = d["citations"][s]
        head = "".join(f"<th>{esc(m)}</th>" for m in d["order"])
        rows = []
        first = d["methods"][d["order"][0]]
        for doc in sorted(d["documents"], key=lambda x: first["ranks"][s].index(x["index"])):
            i = doc["index"]
            cells = "".join(f"<td>#{d['methods'][m]['ranks'][s].index(i) + 1} ({d['methods'][m]['scores'][s][i]:.3g})</td>"
                            for m in d["order"])
            mark = "<td class='wb-cv-cited'>\u2713 cited</td>" if cited[i] else "<td></td>"
            rows.append(f"<tr><td>{i}</td><td>{esc(doc['title'])}</td>{cells}{mark}</tr>")
        flags = [m for m in d["order"] if d["methods"][m]["disagree"][s]]
        flag = (f"<div class='wb-cv-flag'>top document not cited by the span: {esc(', '.join(flags))}</div>"
                if flags else "")
        label = f"<span class='wb-cv-label'>{esc(span['label'])}</span> " if span["label"] else ""
        return (f"<div class='wb-cv-span-block'><div>{label}<span class='wb-cv-span'>{esc(span['text'])}</span></div>"
                f"<table class='wb-cv-table'><tr><th>doc</th><th>title</th>{head}<th>model</th></tr>{''.join(rows)}"
                f"</table>{flag}</div>")

    def to_html(self, full_page: bool = True) -> str:
        """Static, script-free HTML: the reply, then per span the documents ranked by every method."""
        d = self.data
        docs = "".join(f"<li><b>{doc['index']}</b> {esc(doc['title'])}: {esc(doc['text'])}</li>" for doc in d["documents"])
        body = (f"<div class='wb-root wb-snapshot wb-contextview'><style>{static_text('context_view.css')}</style>"
                f"<div class='wb-head'><span class='wb-title'>{esc(self.title)}</span></div>"
                f"<pre class='wb-cv-response'>{esc(d['response'])}</pre><ol class='wb-cv-docs' start='0'>{docs}</ol>"
                + "".join(self._span_html(s) for s in range(len(d["spans"]))) + "</div>")
        return snapshot_page(body, "ContextView", full_page)
