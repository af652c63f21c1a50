"""KVCache: keys (after QK-norm and rotary) and values per layer, owned by generation code.

The model calls ``update(layer, k, v)`` once per layer per forward and ``advance(n)`` at the end;
hooks learn positions from ``hook.ctx`` (per forward), which the model fills from ``seen``.

Storage is one preallocated buffer per layer and per tensor, ``[batch kv_head capacity d_head]``,
grown in chunks, so a decode step writes one position instead of copying the whole cache
(``torch.cat`` every step is quadratic in the generated length). Attention receives a view of the
buffer: the kept keys followed by this forward's keys, oldest first, contiguous along ``k_pos``.

Sliding-window layers (cohere2) keep only the last ``window - 1`` keys/values: a query at index q
sees keys k > q - W, so W - 1 past positions plus itself. Their buffer holds at most
``(window - 1) + slack`` positions (slack = min(chunk, window - 1)); when it fills, the kept
``window - 1`` positions move to the front. Memory is bounded however long the generation.

Example::

    cache = KVCache.for_model(model)
    logits = model(prompt_ids, kv_cache=cache)               # prefill
    logits = model(next_ids, kv_cache=cache)                 # one decode step
    other = cache.clone()                                    # an independent continuation
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCacheError(RuntimeError):
    """A cache used with tensors it cannot hold (other batch/heads/dtype), or left inconsistent."""


class KVCachePrefixError(KVCacheError, ValueError):
    """A prompt that does not start with the tokens the cache holds (bad input: also a ValueError)."""


class KVCache:
    """Per-layer key/value buffers ``[batch kv_head k_pos d_head]``.

    ``seen`` is the number of positions processed so far (the absolute cache index of the next
    token). ``keys[i]`` / ``values[i]`` are views of what layer i keeps (None before the first
    forward); ``length(i)`` is their k_pos length. ``tokens`` [batch seen] are the token ids the
    cache has seen (the model passes them to ``advance``), so ``generate`` can refuse a prompt that
    does not start with them; None when some forward did not say.
    """

    def __init__(self, n_layers: int, windows: Optional[list] = None, chunk: int = 256) -> None:
        if windows is not None and len(windows) != n_layers:
            raise ValueError(f"KVCache: windows has {len(windows)} entries, expected n_layers={n_layers}")
        if chunk < 1:
            raise ValueError(f"KVCache: chunk must be >= 1, got {chunk}")
        self.n_layers = n_layers
        self.windows = list(windows) if windows is not None else [None] * n_layers
        for i, w in enumerate(self.windows):
            if w is not None and w < 1:
                raise ValueError(f"KVCache: window of layer {i} must be >= 1, got {w}")
        self.chunk = chunk
        self.seen = 0
        self._k: list[Optional[torch.Tensor]] = [None] * n_layers   # buffers [batch kv_head cap d_head]
        self._v: list[Optional[torch.Tensor]] = [None] * n_layers
        self._lo = [0] * n_layers            # kept positions are buffer[:, :, lo:hi]
        self._hi = [0] * n_layers
        self._pending: dict = {}             # layer -> (k, v, lo, hi) before this forward (rollback)
        self._tokens: Optional[list] = []    # [batch n] id tensors per forward, oldest first; None: unknown

    @classmethod
    def for_model(cls, model, chunk: int = 256) -> "KVCache":
        """An empty cache shaped for ``model``'s layers (sliding windows from its config)."""
        cfg = model.cfg
        return cls(cfg.n_layers, [cfg.layer_window(i) for i in range(cfg.n_layers)], chunk=chunk)

    # ------------------------------------------------------------------ the model's interface
    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Append this forward's ``k, v`` [batch kv_head pos d_head] to ``layer``.

        Returns ``(k_all, v_all)``: the keys/values this forward's queries attend over (kept past
        positions then the new ones) — always the last ``k_all.shape[2]`` cache indices, which is
        how the model builds its masks.
        """
        if k.dim() != 4 or k.shape != v.shape:
            raise KVCacheError(f"KVCache.update(layer {layer}): expected k and v of the same shape "
                               f"[batch kv_head pos d_head], got {tuple(k.shape)} and {tuple(v.shape)}")
        buf_k, buf_v = self._k[layer], self._v[layer]
        lo, hi = self._lo[layer], self._hi[layer]
        window = self.windows[layer]
        expected = self.seen if window is None else min(self.seen, window - 1)
        if hi - lo != expected:
            raise KVCacheError(
                f"KVCache layer {layer} holds {hi - lo} positions but seen={self.seen} implies {expected}: "
                "a forward was interrupted or layers were updated out of order; call cache.rollback() "
                "or start a fresh cache")
        if buf_k is not None:
            self._check_compatible(layer, buf_k, k)
        self._pending[layer] = (buf_k, buf_v, lo, hi)
        n = k.shape[2]
        grad = torch.is_grad_enabled() and (k.requires_grad or v.requires_grad)
        if buf_k is None or grad or hi + n > buf_k.shape[2]:
            # (re)allocate: kept positions first, then room for this forward and the next ones
            kept_k = None if buf_k is None else buf_k[:, :, lo:hi]
            kept_v = None if buf_v is None else buf_v[:, :, lo:hi]
            k_all = k if kept_k is None or hi == lo else torch.cat([kept_k, k], dim=2)
            v_all = v if kept_v is None or hi == lo else torch.cat([kept_v, v], dim=2)
            total = k_all.shape[2]
            keep = total if window is None else min(total, window - 1)
            if grad:               # autograd-friendly: never write into a tensor attention saved
                buf_k, buf_v = k_all[:, :, total - keep:], v_all[:, :, total - keep:]
            else:
                cap = self._capacity(window, keep)
                buf_k = k_all.new_empty(k_all.shape[:2] + (cap,) + k_all.shape[3:])
                buf_v = v_all.new_empty(v_all.shape[:2] + (cap,) + v_all.shape[3:])
                buf_k[:, :, :keep] = k_all[:, :, total - keep:]
                buf_v[:, :, :keep] = v_all[:, :, total - keep:]
            self._k[layer], self._v[layer] = buf_k, buf_v
            self._lo[layer], self._hi[layer] = 0, keep
            return k_all, v_all
        buf_k[:, :, hi:hi + n] = k
        buf_v[:, :, hi:hi + n] = v
        k_all, v_all = buf_k[:, :, lo:hi + n], buf_v[:, :, lo:hi + n]
        self._hi[layer] = hi + n
        if window is not None:
            self._lo[layer] = max(lo, hi + n - (window - 1))
        return k_all, v_all

    def advance(self, n: int, tokens: Optional[torch.Tensor] = None) -> None:
        """The forward that just ran processed ``n`` new positions (``tokens`` [batch n], their ids)."""
        if self._tokens is not None:
            if tokens is None or tokens.dim() != 2 or tokens.shape[1] != n:
                self._tokens = None          # what the cache holds can no longer be checked
            else:
                self._tokens.append(tokens.detach().clone())
        self.seen += n
        self._pending.clear()

    @property
    def tokens(self) -> Optional[torch.Tensor]:
        """The token ids the cache has seen ``[batch seen]`` (None when a forward did not pass them)."""
        if self._tokens is None:
            return None
        if not self._tokens:
            return None if self.seen else torch.zeros(0, 0, dtype=torch.long)
        if len(self._tokens) > 1:
            self._tokens = [torch.cat([t.to(self._tokens[-1].device) for t in self._tokens], dim=1)]
        return self._tokens[0]

    def check_prefix(self, input_ids: torch.Tensor) -> None:
        """Refuse ``input_ids`` [batch pos] that do not start with the ``seen`` tokens the cache holds.

        Example::

            cache.check_prefix(full_ids)     # KVCacheError naming the first differing position
        """
        if self.seen == 0:
            return
        if input_ids.dim() != 2 or input_ids.shape[1] <= self.seen:
            raise KVCachePrefixError(f"KVCache holds {self.seen} positions; input_ids must be the full sequence "
                               f"(longer than that), got shape {tuple(input_ids.shape)}")
        held = self.tokens
        if held is None:
            return                           # filled without ids (update/advance by hand): cannot check
        if held.shape[0] != input_ids.shape[0]:
            raise KVCachePrefixError(f"KVCache holds a batch of {held.shape[0]} sequences; input_ids has "
                               f"{input_ids.shape[0]} (use a cache made for this batch)")
        prefix = input_ids[:, :self.seen].to(held.device)
        differ = (prefix != held).any(dim=0).nonzero()
        if differ.numel():
            pos = int(differ[0])
            rows = (prefix[:, pos] != held[:, pos]).nonzero()[:, 0].tolist()
            raise KVCachePrefixError(
                f"kv_cache does not hold a prefix of input_ids: position {pos} (rows {rows[:8]}) is token "
                f"{int(input_ids[rows[0], pos])} in input_ids but the cache saw {int(held[rows[0], pos])}. "
                "Pass the cache of this prompt's prefix, or none")

    def rollback(self) -> None:
        """Undo the updates of a forward that did not reach ``advance`` (interrupted mid-way)."""
        for layer, (k, v, lo, hi) in self._pending.items():
            self._k[layer], self._v[layer], self._lo[layer], self._hi[layer] = k, v, lo, hi
        self._pending.clear()

    # ------------------------------------------------------------------ inspection and copies
    @property
    def keys(self) -> list:
        """Per layer, the kept keys ``[batch kv_head k_pos d_head]`` (views; None before use)."""
        return [None if b is None else b[:, :, self._lo[i]:self._hi[i]] for i, b in enumerate(self._k)]

    @property
    def values(self) -> list:
        """Per layer, the kept values ``[batch kv_head k_pos d_head]`` (views; None before use)."""
        return [None if b is None else b[:, :, self._lo[i]:self._hi[i]] for i, b in enumerate(self._v)]

    def length(self, layer: int) -> int:
        """Positions layer ``layer`` keeps (``min(seen, window - 1)`` on sliding layers)."""
        return self._hi[layer] - self._lo[layer]

    def capacity(self, layer: int) -> int:
        """Positions layer ``layer``'s buffer can hold before it is reallocated or compacted."""
        return 0 if self._k[layer] is None else self._k[layer].shape[2]

    def memory_bytes(self) -> int:
        """Bytes allocated by all buffers."""
        return sum(b.numel() * b.element_size() for b in self._k + self._v if b is not None)

    def clone(self) -> "KVCache":
        """An independent copy (one prompt, several continuations: clean vs patched)."""
        if self._pending:
            raise KVCacheError("KVCache.clone(): a forward is in progress (updated but not advanced)")
        new = KVCache(self.n_layers, self.windows, self.chunk)
        new.seen = self.seen
        new._tokens = None if self._tokens is None else list(self._tokens)
        new._k = [None if b is None else b.clone() for b in self._k]
        new._v = [None if b is None else b.clone() for b in self._v]
        new._lo, new._hi = list(self._lo), list(self._hi)
        return new

    def __len__(self) -> int:
        return self.seen

    def __repr__(self) -> str:
        sliding = sum(w is not None for w in self.windows)
        return (f"KVCache(seen={self.seen}, layers={self.n_layers} ({sliding} sliding), "
                f"{self.memory_bytes() / 2**20:.1f} MiB)")

    # ------------------------------------------------------------------ internals
    def _capacity(self, window: Optional[int], keep: int) -> int:
        if window is None:
            return keep + max(self.chunk, keep // 2)            # amortised O(1) per appended position
        return (window - 1) + max(1, min(self.chunk, window - 1))

    def _check_compatible(self, layer: int, buf: torch.Tensor, k: torch.Tensor) -> None:
        if buf.shape[:2] != k.shape[:2] or buf.shape[3] != k.shape[3]:
            raise KVCacheError(
                f"KVCache layer {layer} holds batch={buf.shape[0]}, kv_head={buf.shape[1]}, "
                f"d_head={buf.shape[3]}; got keys [batch={k.shape[0]}, kv_head={k.shape[1]}, "
                f"d_head={k.shape[3]}] (use a fresh cache for another batch)")
        if buf.dtype != k.dtype or buf.device != k.device:
            raise KVCacheError(f"KVCache layer {layer} holds {buf.dtype} on {buf.device}; "
                               f"got keys {k.dtype} on {k.device}")
