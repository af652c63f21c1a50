"""KVCache: keys (after QK-norm and rotary) and values per layer, owned by generation code.

The model calls ``update(layer, k, v)`` once per layer per forward and ``advance(n)`` at the end;
hooks learn positions from ``model.hook_ctx`` which the model fills from ``seen``.
Sliding-window layers keep only their last ``window - 1`` keys/values.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch


class KVCache:
    """Per-layer key/value tensors ``[batch kv_head k_pos d_head]``."""

    def __init__(self, n_layers: int, windows: Optional[list] = None) -> None:
        self.keys: list[Optional[torch.Tensor]] = [None] * n_layers
        self.values: list[Optional[torch.Tensor]] = [None] * n_layers
        self.windows = list(windows) if windows is not None else [None] * n_layers
        self.seen = 0  # positions processed so far (absolute index of the next token)

    @classmethod
    def for_model(cls, model) -> "KVCache":
        cfg = model.cfg
        return cls(cfg.n_layers, [cfg.layer_window(i) for i in range(cfg.n_layers)])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this forward's k, v; return all visible keys/values and their absolute indices."""
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        n = k.shape[2]
        end = self.seen + (n - (0 if self.keys[layer] is None else self.keys[layer].shape[2]))
        k_idx = torch.arange(end - n, end, device=k.device)
        window = self.windows[layer]
        keep = n if window is None else min(n, window - 1)
        self.keys[layer], self.values[layer] = k[:, :, n - keep:], v[:, :, n - keep:]
        return k, v, k_idx

    def advance(self, n: int) -> None:
        self.seen += n

    def clone(self) -> "KVCache":
        """An independent copy (one prompt, several continuations)."""
        new = copy.copy(self)
        new.keys = [None if k is None else k.clone() for k in self.keys]
        new.values = [None if v is None else v.clone() for v in self.values]
        new.windows = list(self.windows)
        return new

    def __len__(self) -> int:
        return self.seen
