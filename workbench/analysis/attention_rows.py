"""Exact attention rows of selected queries and heads at long context, without the full pattern.

``attention_rows`` and ``attention_to_spans`` run ONE forward in which every layer attends on the
model's normal (fused, under ``attn_impl="auto"``) path; an attention observer hands each selected
layer's rotated q and its keys after the KV cache to a small computation of just the selected rows,
with the explicit path's op sequence (``matmul(q, k^T) * scale + mask -> softmax(fp32) -> dtype``).
Memory is O(selected rows x keys), not O(keys^2): at 32k tokens one layer's full pattern is
[head, 32k, 32k], 16 rows of it are [head, 16, 32k].

Rows are aligned to absolute cache indices: ``rows[..., j]`` is attention to the token at index j of
the sequence (cache included). Keys a sliding-window layer's cache already dropped hold exactly 0 —
the value the full pattern would give them. ``AttentionRecorder`` does the same for every forward of
``model.generate`` (the prefill, then each new token over the whole cache).

Axis legend as in ``workbench.model``: batch, head, q_pos, k_pos.

Example::

    rows = attention_rows(model, ids, layers=[0, 5], queries=[-1])      # {0: [1 head 1 pos], 5: ...}
    mass = attention_to_spans(model, ids, [(0, 100), (100, 900)])      # [layer batch head pos 2]
    with AttentionRecorder(model, layers=[3], queries=[-1]) as rec:
        model.generate(ids, max_new_tokens=10)
    rec.steps[4][3]                                                    # [batch head 1 prompt+4]
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..attention_ops import MIN_BLOCK, block_size, mask_rows, observe_attention, pattern_rows
from ..hook_points import StopForward
from ..model import standard_strides


SPAN_BLOCK_BYTES = 32 * 2**20    # attention_to_spans: fp32 scores of one query block (temporaries ~3x)


def _index_list(value, size: int, what: str) -> Optional[list]:
    """None (all) or a list of indices in [0, size), negative ones counted from the end."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or value.is_floating_point():
            raise ValueError(f"{what}: expected an int or a 1-D integer tensor, got {tuple(value.shape)} {value.dtype}")
        value = value.tolist()
    if isinstance(value, int):
        value = [value]
    out = []
    for i in value:
        if not isinstance(i, int) or isinstance(i, bool) or not -size <= i < size:
            raise ValueError(f"{what}: index {i!r} out of range for {size} (expected ints in [-{size}, {size}))")
        out.append(i % size)
    if not out:
        raise ValueError(f"{what}: empty selection")
    return out


class AttentionRecorder:
    """Context manager: attention rows of selected layers, heads and queries at every forward inside it.

    ``queries`` index each forward's new positions (negative from the end; None = all of them):
    ``[-1]`` gives, under ``generate``, the last prompt token at the prefill and then each new token.
    ``steps`` holds one ``{layer: Tensor[batch, n_heads_sel, n_queries_sel, k_pos]}`` per forward
    (model dtype; ``k_pos`` = every cache index so far); ``on_step(step, rows)`` is called after each
    forward, and ``keep=False`` keeps nothing (stream them away in ``on_step``).

    Example::

        with AttentionRecorder(model, layers=[0], heads=[2], queries=[-1]) as rec:
            model.generate(ids, max_new_tokens=5)
        [r[0].shape for r in rec.steps]            # [1 1 1 n], [1 1 1 n+1], ...
    """

    def __init__(self, model, layers=None, heads=None, queries=None,
                 on_step: Optional[Callable[[int, dict], None]] = None, keep: bool = True) -> None:
        cfg = model.cfg
        self.model = model
        self.layers = sorted(set(_index_list(layers, cfg.n_layers, "layers") or range(cfg.n_layers)))
        self.heads = _index_list(heads, cfg.n_heads, "heads")
        if queries is not None:
            _index_list(queries, 1 << 62, "queries")            # type check now; ranges per forward
        self.queries = queries
        self.on_step, self.keep = on_step, keep
        self.steps: list[dict] = []
        self.n_steps = 0                   # forwards recorded so far (also with keep=False)
        self.stop_after_last = False       # attention_rows: end the forward after the last selected layer
        self._current: dict = {}
        self._ctx = None

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> "AttentionRecorder":
        self._ctx = observe_attention(self._observe)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._flush()
        self._ctx.__exit__(*exc)

    # ------------------------------------------------------------------ per layer
    def _observe(self, attn, layer: int, q: torch.Tensor, k: torch.Tensor, masks) -> None:
        if layer not in self.layers:
            return
        if layer == self.layers[0]:
            self._flush()                                      # what an interrupted forward left
        with torch.no_grad():
            self._layer(attn, layer, q, k, masks)
        if layer == self.layers[-1]:
            self._flush()
            if self.stop_after_last:
                raise StopForward

    def _layer(self, attn, layer, q, k, masks) -> None:
        queries = _index_list(self.queries, masks.n_new, "queries") or list(range(masks.n_new))
        total = masks.past_len + masks.n_new
        heads = self.heads if self.heads is not None else list(range(attn.n_heads))
        out = q.new_zeros((q.shape[0], len(heads), len(queries), total))  # [batch head q_sel k_pos]
        for r0, r1, rows in selected_rows(attn, q, k, masks, heads, queries):
            out[:, :, r0:r1, total - rows.shape[-1]:] = rows
        self._current[layer] = out

    def _flush(self) -> None:
        if not self._current:
            return
        step, self._current = dict(self._current), {}
        if self.keep:
            self.steps.append(step)
        if self.on_step is not None:
            self.on_step(self.n_steps, step)
        self.n_steps += 1


def selected_rows(attn, q: torch.Tensor, k: torch.Tensor, masks, heads: Sequence[int], queries: Sequence[int],
                  block: Optional[int] = None):
    """Yield ``(r0, r1, rows)``: rows [batch head_sel r1-r0 k_pos] of the pattern for ``queries[r0:r1]``
    (this forward's position indices) over the keys ``k`` attention receives, in blocks of bounded size.

    ``q`` [batch head pos d_head] and ``k`` [batch kv_head k_pos d_head] as an attention observer gets them."""
    n_keys = k.shape[-2]
    # [batch head_sel k_pos d_head]: repeat_kv(k)[:, heads] (contiguous, as explicit) without the other heads
    group = q.shape[1] // k.shape[1]                  # 1 when keys arrive ungrouped (workbench.tl_gqa)
    keys = standard_strides(k)[:, torch.tensor([h // group for h in heads], device=k.device)]
    all_heads = list(heads) == list(range(attn.n_heads))
    block = block or block_size(len(queries), n_keys, q.shape[0] * len(heads), q.dtype)
    for r0 in range(0, len(queries), block):
        idx = list(queries[r0:r0 + block])
        n = len(idx)
        idx += idx[-1:] * max(0, min(MIN_BLOCK, masks.n_new) - n)   # as many rows as the full matmul's
        # blocks (>= MIN_BLOCK, or all n_new): BLAS picks its kernel by row count (fp32: another below 4)
        idx_t = torch.tensor(idx, device=q.device)
        rows_q = q.transpose(1, 2)[:, idx_t]                    # [batch n head d_head]: the explicit
        rows_q = (rows_q if all_heads else rows_q[:, :, heads]).transpose(1, 2)  # path's storage order
        if len(idx) == 1 and attn.use_rope:
            rows_q = standard_strides(rows_q)                   # as Attention._explicit
        rows = pattern_rows(rows_q, keys, attn.scale,
                            lambda a, b: mask_rows(masks.past_len, masks.n_new, masks.pad, masks.dtype, q.device,
                                                   attn.window, n_keys, idx_t[a:b]), block=len(idx))
        yield r0, r0 + n, rows[:, :, :n]


def attention_rows(model, input_ids: torch.Tensor, layers=None, heads=None, queries=None,
                   attention_mask: Optional[torch.Tensor] = None, kv_cache=None) -> dict:
    """{layer: Tensor[batch, n_heads_sel, n_queries_sel, k_pos]}: exact attention rows in one forward.

    ``queries`` are positions of ``input_ids`` (negative from the end; None = all), ``heads`` query
    heads, ``layers`` block indices (None = all). ``k_pos`` covers every cache index (a
    ``kv_cache``'s past tokens first). Equals the same rows of the explicit path's ``hook_pattern``
    (same ops; bit for bit where the host's BLAS gives a row subset the full matmul's bits). Without
    a ``kv_cache`` the forward ends after the last selected layer; with one, it runs to the end and
    the cache is extended as by ``model(input_ids, kv_cache=...)``.

    Example::

        rows = attention_rows(model, ids, layers=[2], heads=[0, 3], queries=range(-16, 0))
        rows[2].shape                                     # [batch, 2, 16, pos]
    """
    _check_ids(model, input_ids)
    if isinstance(queries, range):
        queries = list(queries)
    _index_list(queries, input_ids.shape[1], "queries")
    rec = AttentionRecorder(model, layers, heads, queries)
    rec.stop_after_last = kv_cache is None
    kwargs = {"attention_mask": attention_mask, "kv_cache": kv_cache}
    if kv_cache is not None:
        kwargs["logits_to_keep"] = 1
    with torch.no_grad(), rec:
        try:
            model(input_ids, **kwargs)
        except StopForward:
            pass
    return rec.steps[-1]


def _check_ids(model, input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids: expected an integer tensor of shape [batch, pos], got {got}")


def attention_to_spans(model, input_ids: torch.Tensor, spans, queries=None, layers=None,
                       attention_mask: Optional[torch.Tensor] = None, heads=None) -> torch.Tensor:
    """Attention mass from each selected query to each key span: Tensor[layer, batch, head, n_queries, n_spans].

    ``spans``: ``(start, end)`` token ranges (end exclusive), ``(name, start, end)`` triples or the
    ``Span``s of ``spans_from_chat``; ranges may overlap. Computed per layer and per query block during
    one forward (every layer on the fused path), so memory stays O(query block x keys). float32 sums
    of the model-dtype pattern, in ``layers`` order (None = all layers), ``queries`` (None = all)
    and ``heads`` (None = all) as in ``attention_rows``.

    Example::

        ids, spans = spans_from_chat(tok, messages, documents=docs)
        mass = attention_to_spans(model, ids, spans, queries=[-1])   # [layer 1 head 1 n_spans]
    """
    _check_ids(model, input_ids)
    n = input_ids.shape[1]
    ranges = _span_ranges(spans, n)
    if isinstance(queries, range):
        queries = list(queries)
    q_list = _index_list(queries, n, "queries") or list(range(n))
    rec = AttentionRecorder(model, layers, heads, q_list)
    h_list = rec.heads if rec.heads is not None else list(range(model.cfg.n_heads))
    out = torch.zeros(len(rec.layers), input_ids.shape[0], len(h_list), len(q_list), len(ranges))
    slot = {layer: i for i, layer in enumerate(rec.layers)}

    def layer_fn(attn, layer, q, k, masks) -> None:     # replaces the recorder's row storage
        offset = masks.past_len + masks.n_new - k.shape[-2]
        block = max(MIN_BLOCK, SPAN_BLOCK_BYTES // (4 * k.shape[-2] * q.shape[0] * len(h_list)))
        for r0, r1, rows in selected_rows(attn, q, k, masks, h_list, q_list, block):
            for j, (start, end) in enumerate(ranges):
                lo, hi = max(start - offset, 0), max(end - offset, 0)
                out[slot[layer], :, :, r0:r1, j] = rows[..., lo:hi].sum(-1, dtype=torch.float32)

    rec._layer = layer_fn
    rec.stop_after_last = True
    with torch.no_grad(), rec:
        try:
            model(input_ids, attention_mask=attention_mask)
        except StopForward:
            pass
    return out


def _span_ranges(spans, n: int) -> list:
    if isinstance(spans, (str, bytes)) or not hasattr(spans, "__iter__"):
        raise ValueError(f"spans: expected a list of (start, end) or (name, start, end), got {type(spans).__name__}")
    ranges = []
    for s in spans:
        if hasattr(s, "start") and hasattr(s, "end") and not isinstance(s, range):
            start, end = s.start, s.end
        elif isinstance(s, (tuple, list)) and len(s) in (2, 3):
            start, end = s[-2], s[-1]
        else:
            raise ValueError(f"spans: each span must be (start, end) or (name, start, end), got {s!r}")
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= n):
            raise ValueError(f"spans: range {s!r} is not 0 <= start <= end <= {n} (token positions of input_ids)")
        ranges.append((start, end))
    if not ranges:
        raise ValueError("spans: empty list")
    return ranges
