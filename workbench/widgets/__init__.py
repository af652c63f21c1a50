"""Jupyter views of the model: tokens, attention, logit lens and live generation.

Built on ipywidgets 8 + anywidget with plain ES modules and CSS in ``static/`` (no build step, no CDN, nothing
fetched at display time). Token text reaches the page only through ``textContent``; numbers travel as bytes,
and only the slice on screen. Every view also has ``to_html()``: a self-contained, script-free snapshot
(also put in the output as ``text/html`` for exported notebooks).

Example::

    from workbench.widgets import TokenView, AttentionView, LogitLensView, GenerationView
    TokenView(tok, "안녕하세요 👋")
    AttentionView(model, tok, "The cat sat on the mat. The cat")
    LogitLensView(model, tok, "The capital of France is", target=" Paris")
    CompareView(model, tok, clean_prompt, corrupted_prompt, layer=2)
    view = GenerationView(model, tok, "Once upon a time", max_new_tokens=30); view   # then view.run()
    link_selection(token_view, attention_view)      # selecting a token in one selects it in the other

Theme-aware (JupyterLab light and dark), a colourbar on every heatmap (linear / log / per-row max), PNG/SVG
export buttons, and snapshots that stay under 64 KiB (downsampled, and they say so).
"""

from .attention_view import AttentionView
from .compare_view import CompareView
from .context_view import ContextView
from .generation_view import GenerationView
from .links import link_selection
from .logit_lens_view import LogitLensView
from .token_view import TokenView

__all__ = ["AttentionView", "CompareView", "ContextView", "GenerationView", "LogitLensView", "TokenView",
           "link_selection"]
