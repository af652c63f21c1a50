"""The numbers behind AttentionView: stored patterns, windows, thumbnails, head scores, a sequence profile.

``PatternStore`` keeps each layer's ``[head q_pos k_pos]`` pattern (float32, grown as a generation adds query
rows) and cuts out only what the browser shows: a window, max-pooled thumbnails, the weight of each shown row
that falls outside the key window, a downsampled profile of the whole sequence for the minimap.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..analysis.head_scores import previous_occurrence
from ..hook_names import act_name

SCORE_NAMES = ("previous-token", "induction", "BOS")


class PatternStore:
    """Attention patterns of one sequence, per layer.

    Example::

        store = PatternStore({0: pattern0}, T)       # pattern0: [head T T]
        store.window(0, head=1, q0=0, k0=0, size=16)  # [16 16]
    """

    def __init__(self, patterns: Optional[dict] = None, n: int = 0) -> None:
        self.layers: dict[int, torch.Tensor] = dict(sorted((patterns or {}).items()))   # layer -> [head cap cap]
        self.n = n                                                                        # positions stored

    @classmethod
    def empty(cls, layers: Sequence[int], n_heads: int) -> "PatternStore":
        return cls({int(layer): torch.zeros(n_heads, 0, 0) for layer in layers}, 0)

    @property
    def n_heads(self) -> int:
        return next(iter(self.layers.values())).shape[0] if self.layers else 0

    def add_rows(self, layer: int, pattern: torch.Tensor, positions: Sequence[int]) -> None:
        """Store query rows ``pattern`` [head n k_pos] for consecutive absolute query ``positions``. The keys
        are the last k_pos positions up to the newest query (a KV cache's view, sliding windows included)."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} is not one of this view's layers {list(self.layers)}")
        if pattern.dim() != 3 or pattern.shape[1] != len(positions):
            raise ValueError(f"{act_name('pattern', layer)}: expected [head, {len(positions)}, k_pos], "
                             f"got {tuple(pattern.shape)}")
        q0, q1 = int(positions[0]), int(positions[-1]) + 1
        if q1 - q0 != len(positions):
            raise ValueError(f"positions must be consecutive, got {list(positions)[:8]}")
        k0 = q1 - pattern.shape[2]
        if k0 < 0:
            raise ValueError(f"{act_name('pattern', layer)} has {pattern.shape[2]} keys for queries up to {q1 - 1}")
        store = self._grow(layer, q1)
        store[:, q0:q1, :] = 0
        store[:, q0:q1, k0:q1] = pattern.detach().to("cpu", torch.float32)
        self.n = max(self.n, q1)

    def _grow(self, layer: int, size: int) -> torch.Tensor:
        store = self.layers[layer]
        if store.shape[1] < size:
            cap = max(size, 2 * store.shape[1], 16)
            grown = torch.zeros(store.shape[0], cap, cap)
            grown[:, : store.shape[1], : store.shape[2]] = store
            self.layers[layer] = store = grown
        return store

    def full(self, layer: int) -> torch.Tensor:
        """[head T T] view (not a copy) of the stored positions."""
        return self.layers[layer][:, : self.n, : self.n]

    def row(self, layer: int, head: int, query: int) -> torch.Tensor:
        """[T]: the attention of ``query`` over every key."""
        return self.layers[layer][head, query, : self.n]

    def window(self, layer: int, head: int, q0: int, k0: int, size: int) -> torch.Tensor:
        return self.layers[layer][head, q0: min(self.n, q0 + size), k0: min(self.n, k0 + size)]

    def outside(self, layer: int, head: int, q0: int, nq: int, k0: int, nk: int) -> torch.Tensor:
        """[nq 2]: each shown row's weight on keys left of / right of the key window."""
        rows = self.layers[layer][head, q0: q0 + nq, : self.n]
        return torch.stack([rows[:, :k0].sum(-1), rows[:, k0 + nk:].sum(-1)], dim=-1)

    def thumbnails(self, layers: Sequence[int], size: int, magnitude: bool = False) -> torch.Tensor:
        """[len(layers) head s s], each head's T×T pattern max-pooled (max, so one sharp edge stays visible);
        ``magnitude``: of the absolute values (differences, where negative weight matters as much)."""
        if not layers or self.n == 0:
            return torch.zeros(len(layers), self.n_heads, 0, 0)
        pick = (lambda t: t.abs()) if magnitude else (lambda t: t)
        return torch.stack([F.adaptive_max_pool2d(pick(self.full(layer))[None], (size, size))[0] for layer in layers])

    def head_scores(self, token_ids: Optional[torch.Tensor]) -> dict[str, list[list[float]]]:
        """Per layer and head, from the stored patterns of THIS sequence: mean attention to the previous token,
        to the token after the previous occurrence of the current token (induction; needs ``token_ids`` and
        a repeat), and to position 0 (BOS)."""
        T = self.n
        out: dict[str, list[list[float]]] = {name: [] for name in SCORE_NAMES}
        q = torch.arange(T)
        ind_q = ind_k = None
        if token_ids is not None and T > 1:
            prev = previous_occurrence(token_ids[None, :T])[0]          # [pos]
            mask = (prev >= 0) & (prev + 1 < q)
            ind_q, ind_k = q[mask], prev[mask] + 1
        for layer in self.layers:
            full = self.full(layer)                                       # [head T T]
            out["previous-token"].append(full[:, q[1:], q[1:] - 1].mean(-1).tolist() if T > 1
                                         else [0.0] * full.shape[0])
            out["BOS"].append(full[:, :, 0].mean(-1).tolist() if T else [0.0] * full.shape[0])
            if ind_q is not None and len(ind_q):
                out["induction"].append(full[:, ind_q, ind_k].mean(-1).tolist())
            else:
                out["induction"].append([0.0] * full.shape[0])
        return out

    def profile(self, layer: int, head: int, query: int, bins: int) -> torch.Tensor:
        """A downsampled view of the whole sequence for the minimap: the selected query's row, or (no query)
        the attention each key receives, averaged over queries. [min(T, bins)], max-pooled."""
        if self.n == 0:
            return torch.zeros(0)
        full = self.layers[layer][head, : self.n, : self.n]
        values = full[query] if 0 <= query < self.n else full.sum(0) / torch.arange(self.n, 0, -1)
        return pool1d(values, bins)


# ----------------------------------------------------------------------------- ragwire: rows of a long prompt
class RowStore(PatternStore):
    """Exact rows ``[head n_q T]`` of the queries ``[q0, q0 + n_q)`` per layer (from ``attention_rows``), for
    prompts too long for ``T x T`` patterns: everything the view cuts out is computed from these rows, and
    rows of queries that were not computed read as 0 (the window, thumbnails and captions say which).

    Example::

        rows = attention_rows(model, ids, queries=range(T - 48, T))     # {layer: [1 head 48 T]}
        store = RowStore({l: r[0] for l, r in rows.items()}, q0=T - 48, n=T)
    """

    def __init__(self, rows: dict, q0: int, n: int) -> None:
        super().__init__({int(k): v.detach().to("cpu", torch.float32) for k, v in rows.items()}, n)
        self.q0 = int(q0)
        self.q1 = self.q0 + next(iter(self.layers.values())).shape[1]

    def add_rows(self, layer, pattern, positions) -> None:
        raise ValueError("AttentionView.from_model: the rows of a long prompt are fixed; build a new view")

    def row(self, layer: int, head: int, query: int) -> torch.Tensor:
        if self.q0 <= query < self.q1:
            return self.layers[layer][head, query - self.q0]
        return torch.zeros(self.n)

    def full(self, layer: int) -> torch.Tensor:
        """[head T T] with the stored rows filled in (a T x T tensor: only for what fits in memory)."""
        rows = self.layers[layer]
        out = torch.zeros(rows.shape[0], self.n, self.n)
        out[:, self.q0: self.q1] = rows
        return out

    def window(self, layer: int, head: int, q0: int, k0: int, size: int) -> torch.Tensor:
        q1, k1 = min(self.n, q0 + size), min(self.n, k0 + size)
        out = torch.zeros(max(0, q1 - q0), max(0, k1 - k0))
        a, b = max(q0, self.q0), min(q1, self.q1)
        if a < b:
            out[a - q0: b - q0] = self.layers[layer][head, a - self.q0: b - self.q0, k0:k1]
        return out

    def outside(self, layer: int, head: int, q0: int, nq: int, k0: int, nk: int) -> torch.Tensor:
        rows = torch.stack([self.row(layer, head, q) for q in range(q0, min(self.n, q0 + nq))]) if nq else \
            torch.zeros(0, self.n)
        return torch.stack([rows[:, :k0].sum(-1), rows[:, k0 + nk:].sum(-1)], dim=-1)

    def thumbnails(self, layers: Sequence[int], size: int, magnitude: bool = False) -> torch.Tensor:
        """[len(layers) head s s]: each thumbnail row max-pools the stored queries that fall in it (0 elsewhere)."""
        out = torch.zeros(len(layers), self.n_heads, size, size)
        for i, layer in enumerate(layers):
            rows = self.layers[layer].abs() if magnitude else self.layers[layer]           # [head n_q T]
            keys = F.adaptive_max_pool1d(rows, size) if self.n > size else rows             # [head n_q s]
            band = (torch.arange(self.q0, self.q1) * size) // max(self.n, 1)                # thumbnail row per query
            for r in band.unique().tolist():
                out[i, :, r] = keys[:, band == r].amax(1)
        return out

    def head_scores(self, token_ids: Optional[torch.Tensor]) -> dict[str, list[list[float]]]:
        """As ``PatternStore.head_scores``, over the stored queries only."""
        q = torch.arange(self.q0, self.q1)
        out: dict[str, list[list[float]]] = {name: [] for name in SCORE_NAMES}
        prev = previous_occurrence(token_ids[None, : self.n])[0][q] if token_ids is not None else None
        for layer, rows in self.layers.items():                                            # [head n_q T]
            i = torch.arange(len(q))
            has = q >= 1
            out["previous-token"].append(rows[:, i[has], q[has] - 1].mean(-1).tolist() if bool(has.any())
                                         else [0.0] * rows.shape[0])
            out["BOS"].append(rows[:, :, 0].mean(-1).tolist())
            ind = (prev >= 0) & (prev + 1 < q) if prev is not None else torch.zeros(len(q), dtype=torch.bool)
            out["induction"].append(rows[:, i[ind], prev[ind] + 1].mean(-1).tolist() if bool(ind.any())
                                    else [0.0] * rows.shape[0])
        return out

    def profile(self, layer: int, head: int, query: int, bins: int) -> torch.Tensor:
        """The query's row when it is stored; else the attention each key receives from the stored queries
        (mean over those that may attend to it)."""
        if self.q0 <= query < self.q1:
            return pool1d(self.row(layer, head, query), bins)
        rows = self.layers[layer][head]                                                    # [n_q T]
        seen = (torch.arange(self.q0, self.q1)[:, None] >= torch.arange(self.n)[None]).sum(0).clamp(min=1)
        return pool1d(rows.sum(0) / seen, bins)


def pool1d(values: torch.Tensor, bins: int) -> torch.Tensor:
    """[n] -> [min(n, bins)] by max-pooling."""
    if values.numel() <= bins:
        return values.float()
    return F.adaptive_max_pool1d(values.float()[None, None], bins)[0, 0]


def check_spans(spans, n: Optional[int] = None) -> list[list]:
    """``[(name, start, end), ...]`` (end exclusive) -> a JSON-able list; refuses bad ranges by name."""
    out = []
    for s in spans or ():
        if not (isinstance(s, (list, tuple)) and len(s) == 3):
            raise ValueError(f"spans: expected (name, start, end) triples, got {s!r:.80}")
        name, start, end = str(s[0]), int(s[1]), int(s[2])
        if start < 0 or end <= start or (n is not None and end > n):
            raise ValueError(f"spans: {name!r} has range [{start}, {end}); expected 0 <= start < end"
                             + (f" <= {n}" if n is not None else ""))
        out.append([name, start, end])
    return out
