"""Linked selection: selecting a token in one view selects the same position in the others.

Each view names its selection trait: ``TokenView.selected``, ``AttentionView.query``, ``LogitLensView.selected``
(a position, -1 for none); ``ContextView.position`` (the selected span's first token in prompt + reply ids;
selecting a token inside a span selects that span). The views pan their windows to a selected position and the token strips scroll to it.
"""

from __future__ import annotations

from typing import Any

import traitlets

SELECTION_TRAIT = {"TokenView": "selected", "AttentionView": "query", "LogitLensView": "selected",
                   "ContextView": "position"}   # ContextView: the selected span's first token (prompt + reply)


def selection_trait(view: Any) -> str:
    """The name of ``view``'s selected-position trait."""
    for cls in type(view).__mro__:
        if cls.__name__ in SELECTION_TRAIT:
            return SELECTION_TRAIT[cls.__name__]
    raise TypeError(f"link_selection: {type(view).__name__} has no selected position; expected one of "
                    f"{sorted(SELECTION_TRAIT)}")


def link_selection(*views: Any) -> list[traitlets.link]:
    """Link the selected position of ``views`` (two or more); returns the links (``link.unlink()`` undoes one).

    Example::

        tv, av = TokenView(tok, ids), AttentionView(model, tok, ids)
        link_selection(tv, av)          # click a chip: the heatmap selects that query row, and back
    """
    if len(views) < 2:
        raise ValueError(f"link_selection: expected two or more views, got {len(views)}")
    first = views[0]
    return [traitlets.link((first, selection_trait(first)), (v, selection_trait(v))) for v in views[1:]]
