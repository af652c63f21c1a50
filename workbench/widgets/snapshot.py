"""Static, script-free snapshots of the views (``view.to_html()``), kept under a size budget.

A snapshot is what nbconvert/GitHub show of a widget output. Heatmaps go in as one small PNG (data URI, no
per-cell markup), downsampled by max-pooling when larger than ``MAX_CELLS`` a side, and the image says so in
its caption. Token strips keep at most what the budget allows and say how many were left out. Every view's
snapshot stays under ``SNAPSHOT_FALLBACK_LIMIT`` (64 KiB), the size a displayed view may add to a notebook.
"""

from __future__ import annotations

import base64
import html
import struct
import zlib
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ._base import static_text, visible

SNAPSHOT_FALLBACK_LIMIT = 64 * 1024  # bytes of text/html a displayed view may add to the saved notebook
MAX_CELLS = 96                        # heatmap cells a side in a snapshot image (more are max-pooled)
CHIP_BUDGET = 36 * 1024               # bytes of token chips in one snapshot

# The light colour maps (snapshots are read outside JupyterLab, on white): 0 -> white, 1 -> dark blue;
# the diverging one: -1 -> red, 0 -> white, +1 -> blue.
_BLUE = (33, 90, 180)
_RED = (190, 40, 40)


def esc(s: Any) -> str:
    """HTML-escape for text and attribute values (quotes included)."""
    return html.escape(str(s), quote=True)


def blue(p: float) -> str:
    """The sequential colour (as CSS) of a value in [0, 1], the same map as the PNGs."""
    p = min(max(float(p), 0.0), 1.0)
    return "rgb({},{},{})".format(*(round(255 + (c - 255) * p) for c in _BLUE))


def ink(p: float) -> str:
    """Black or white text, whichever contrasts more with ``blue(p)``."""
    return "#fff" if p > 0.55 else "#111"


def colour_rgb(values: torch.Tensor, signed: bool = False) -> torch.Tensor:
    """``values [h w]`` (in [0, 1], or [-1, 1] when ``signed``) -> uint8 ``[h w 3]``."""
    v = values.float().clamp(-1 if signed else 0, 1)[..., None]
    white = torch.full((3,), 255.0)
    pos = white + (torch.tensor(_BLUE, dtype=torch.float32) - white) * v.clamp(min=0)
    neg = white + (torch.tensor(_RED, dtype=torch.float32) - white) * (-v).clamp(min=0)
    rgb = torch.where(v >= 0, pos, neg)
    return (rgb + 0.5).clamp(0, 255).to(torch.uint8)


def png_bytes(rgb: torch.Tensor) -> bytes:
    """A minimal PNG (8-bit RGB, no filter) of ``rgb [h w 3]`` uint8."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + bytes(rgb[i].contiguous().numpy().tobytes()) for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def downsample(values: torch.Tensor, max_cells: int = MAX_CELLS, signed: bool = False) -> tuple[torch.Tensor, bool]:
    """Max-pool ``values [h w]`` to at most ``max_cells`` a side (by magnitude when ``signed``); (result, pooled?)."""
    h, w = values.shape
    if h <= max_cells and w <= max_cells:
        return values, False
    size = (min(h, max_cells), min(w, max_cells))
    if not signed:
        return F.adaptive_max_pool2d(values[None, None].float(), size)[0, 0], True
    hi = F.adaptive_max_pool2d(values[None, None].float(), size)[0, 0]
    lo = -F.adaptive_max_pool2d(-values[None, None].float(), size)[0, 0]
    return torch.where(hi >= -lo, hi, lo), True


def heatmap_img(values: torch.Tensor, cell_px: int, signed: bool = False, label: str = "heatmap") -> tuple[str, str]:
    """``<img>`` of a heatmap (data-URI PNG, pixelated scaling) and a caption saying if it was downsampled."""
    h, w = values.shape
    shown, pooled = downsample(values, signed=signed)
    sh, sw = shown.shape
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(colour_rgb(shown, signed))).decode()
    px = max(2, min(cell_px, 560 // max(sh, sw, 1)))
    img = (f"<img class='wb-snap-heat' alt='{esc(label)}' src='{uri}' width='{sw * px}' height='{sh * px}' "
           "style='image-rendering:pixelated'>")
    note = (f"downsampled for the snapshot: {h}×{w} cells max-pooled to {sh}×{sw}" if pooled else "")
    return img, note


def legend_html(lo: float, hi: float, signed: bool = False, scale: str = "linear") -> str:
    """A colourbar: gradient plus its end values (small values in scientific notation)."""
    stops = ",".join(blue(x / 4) for x in range(5)) if not signed else \
        "rgb(190,40,40),#fff,rgb(33,90,180)"
    return (f"<div class='wb-legend'><span class='wb-legend-lo'>{esc(fmt_value(lo))}</span>"
            f"<span class='wb-legend-bar' style='background:linear-gradient(to right,{stops})'></span>"
            f"<span class='wb-legend-hi'>{esc(fmt_value(hi))}</span><span class='wb-muted'> {esc(scale)}</span></div>")


def fmt_value(p: float) -> str:
    """Three decimals, or scientific notation for small non-zero magnitudes (never a misleading 0.000)."""
    p = float(p)
    if p != 0 and abs(p) < 1e-3:
        return f"{p:.1e}"
    return f"{p:.3f}"


def snapshot_page(body: str, title: str = "commandr-workbench", full_page: bool = True) -> str:
    """Self-contained HTML (inline CSS, no script) around a view's snapshot: a whole document, or a fragment
    with its own ``<style>`` for a notebook output."""
    css = static_text("widgets.css")
    if not full_page:
        return f"<div class='wb-snapshot-wrap'><style>{css}</style>{body}</div>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{css}</style></head><body>{body}</body></html>")


class SnapshotMixin:
    """Adds the static snapshot (``to_html(full_page=False)``) as a ``text/html`` fallback to the widget's mime
    bundle: JupyterLab renders the live widget; nbconvert/GitHub, which cannot run it, show the snapshot (of
    the view as first displayed). Snapshots are built to fit 64 KiB (downsampled images, capped strips); one
    that still does not is replaced by a one-line note."""

    def _repr_mimebundle_(self, **kwargs: Any):
        bundle = super()._repr_mimebundle_(**kwargs)  # type: ignore[misc]
        data, meta = bundle if isinstance(bundle, tuple) else (bundle, {})
        if data is not None:
            snapshot = self.to_html(full_page=False)  # type: ignore[attr-defined]
            if len(snapshot.encode("utf-8")) > SNAPSHOT_FALLBACK_LIMIT:
                snapshot = (f"<p><i>{esc(type(self).__name__)}: an interactive widget (its static snapshot is "
                            "too large to embed; save one with <code>view.to_html()</code>).</i></p>")
            data = {**data, "text/html": snapshot}
        return data, meta


def token_tooltip(r: dict) -> str:
    return (f"id {r['id']} · bytes {r['hex'] or '—'} · chars [{r['start']}, {r['end']}) {r['chars']!r}"
            + (" · special" if r["special"] else ""))


def chips_html(records: Sequence[dict], weights: Sequence[float] | None = None, budget: int = CHIP_BUDGET,
               first: int = 0) -> str:
    """Static chips (escaped text, title tooltips) for snapshots, at most ``budget`` bytes of them (tooltips
    are dropped first, then chips; the strip says how many were left out). ``first``: index of records[0]."""
    full = _chips(records, weights, first, titles=True)
    if sum(len(p) for p in full) <= budget:
        return "<div class='wb-chips'>" + "".join(full) + "</div>"
    parts, used = [], 0
    for p in _chips(records, weights, first, titles=False):
        if used + len(p) > budget:
            break
        parts.append(p)
        used += len(p)
    n = sum(1 for p in parts if p.startswith("<span class='wb-tok"))
    note = f"<div class='wb-muted wb-snap-note'>snapshot shows {n} of {len(records)} tokens (size budget)</div>"
    return note + "<div class='wb-chips'>" + "".join(parts) + "</div>"


def _chips(records: Sequence[dict], weights: Sequence[float] | None, first: int, titles: bool) -> list[str]:
    parts = []
    for i, r in enumerate(records):
        cls = "wb-tok" + (" wb-special" if r["special"] else "") + (" wb-partial" if r["partial"] else "")
        style = ""
        if weights is not None:
            w = float(weights[i])
            style = f" style='background:{blue(w)};color:{ink(w)}'"
        title = f" title='{esc(token_tooltip(r))}'" if titles else ""
        sub = f"<span class='wb-chars'>{esc(visible(r['chars']))}</span>" if r["partial"] and titles else ""
        idx = f"<span class='wb-id'>{r['id']}</span>" if titles else ""
        parts.append(f"<span class='{cls}'{title}{style}><span class='wb-text'>{esc(r['text'])}</span>{sub}{idx}"
                     "</span>")
        if r["newline"]:
            parts.append("<span class='wb-break'></span>")
    return parts
