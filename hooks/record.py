"""Recording recipes: store activations, accumulate them over calls, stop the forward early.

Example::

    from hooks import record, accumulate, stop_after, run_until

    store, fwd = record("blocks.1.hook_resid_post")
    model.run_with_hooks(ids, fwd_hooks=fwd)
    store["blocks.1.hook_resid_post"]                    # [batch pos d_model]

    acc, fwd = accumulate(lambda n: n.endswith("hook_resid_pre"), dims=(0, 1))
    for batch in batches:
        model.run_with_hooks(batch, fwd_hooks=fwd)
    acc.mean("blocks.0.hook_resid_pre")                  # [1 1 d_model]: mean over every token seen

    cache = run_until(model, ids, layer=2)               # blocks 0..2 only, then StopForward
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch

from workbench.activation_cache import ActivationCache
from workbench.hook_names import act_name
from workbench.hook_points import StopForward

Names = Union[str, list, tuple, set, Callable[[str], bool]]


def _pairs(names: Names, fn) -> list:
    """(name or predicate, fn) pairs for ``model.hooks``/``run_with_hooks``."""
    if isinstance(names, str) or callable(names):
        return [(names, fn)]
    if isinstance(names, (list, tuple, set)) and names:
        return [(n, fn) for n in names]
    raise TypeError(f"names: expected a hook name, a non-empty list of names or a predicate, got {names!r}")


def record_hook(store: dict, key: Optional[str] = None, device=None, append: bool = False,
                clone: bool = False):
    """``fn(x, hook)`` that stores ``x`` (detached) in ``store[key or hook.name]``.

    ``append=True`` keeps a list with one tensor per call (e.g. one per generation step).

    Example::

        store = {}
        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_attn_out", record_hook(store))])
    """
    def fn(x: torch.Tensor, hook) -> None:
        t = x.detach()
        t = t.to(device) if device is not None else t
        t = t.clone() if clone else t
        name = key or hook.name
        if append:
            store.setdefault(name, []).append(t)
        else:
            store[name] = t

    return fn


def record(names: Names, store: Optional[dict] = None, device=None, append: bool = False,
           clone: bool = False):
    """``(store, fwd_hooks)`` recording every hook in ``names`` (a name, list or predicate).

    Example::

        store, fwd = record(["blocks.0.hook_resid_pre", "blocks.1.attn.hook_z"], append=True)
        model.generate(ids, max_new_tokens=5, fwd_hooks=fwd)
        len(store["blocks.1.attn.hook_z"])                # 6: the prefill and 5 decode steps
    """
    store = {} if store is None else store
    return store, _pairs(names, record_hook(store, device=device, append=append, clone=clone))


class Accumulator:
    """Running sums (float32) and counts per hook name; ``mean(name)``, ``sum(name)``, ``result()``.

    With ``dims`` (e.g. ``(0, 1)`` = batch and pos) each call is first summed over those axes
    (kept as size 1) and the count grows by their size, so calls with different sequence lengths
    (generation steps, ragged batches) combine into the exact mean over every element seen.
    """

    def __init__(self, reduce: str = "mean", dims: Optional[tuple] = None, device=None) -> None:
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce: expected 'mean' or 'sum', got {reduce!r}")
        self.reduce, self.dims, self.device = reduce, tuple(dims) if dims is not None else None, device
        self.sums: dict = {}
        self.counts: dict = {}

    def hook(self, x: torch.Tensor, hook) -> None:
        t = x.detach().to(torch.float32)
        t = t.to(self.device) if self.device is not None else t
        n = 1
        if self.dims:
            n = math.prod(t.shape[d] for d in self.dims)
            t = t.sum(self.dims, keepdim=True)
        name = hook.name
        if name in self.sums:
            if self.sums[name].shape != t.shape:
                raise ValueError(f"accumulate: {name!r} gave shape {tuple(x.shape)} after "
                                 f"{tuple(self.sums[name].shape)}; pass dims= to reduce the axes that vary")
            self.sums[name] = self.sums[name] + t
            self.counts[name] += n
        else:
            self.sums[name], self.counts[name] = t, n

    __call__ = hook

    def sum(self, name: str) -> torch.Tensor:
        return self._get(name)

    def mean(self, name: str) -> torch.Tensor:
        return self._get(name) / self.counts[name]

    def _get(self, name: str) -> torch.Tensor:
        if name not in self.sums:
            raise KeyError(f"{name!r} was never seen; accumulated: {sorted(self.sums)}")
        return self.sums[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.mean(name) if self.reduce == "mean" else self.sum(name)

    def result(self) -> dict:
        """name -> mean (or sum) tensor, in float32."""
        return {name: self[name] for name in self.sums}


def accumulate(names: Names, reduce: str = "mean", dims: Optional[tuple] = None, device=None):
    """``(Accumulator, fwd_hooks)`` summing or averaging ``names`` over every call (and ``dims``).

    Example::

        acc, fwd = accumulate("blocks.0.hook_mlp_out", dims=(0, 1))
        model.generate(ids, max_new_tokens=10, fwd_hooks=fwd)
        acc["blocks.0.hook_mlp_out"]                       # mean over prompt and generated tokens
    """
    acc = Accumulator(reduce, dims, device)
    return acc, _pairs(names, acc.hook)


def _stop(x, hook):
    raise StopForward(hook.name)


def stop_after(layer_or_name: Union[int, str]) -> list:
    """``[(name, fn)]`` ending the forward (``StopForward``) once ``name`` (an int: that layer's
    ``hook_resid_post``) has fired. Put it LAST in ``fwd_hooks`` so hooks on the same point run first.

    Example::

        store, fwd = record("blocks.1.hook_resid_post")
        model.run_with_hooks(ids, fwd_hooks=fwd + stop_after(1))   # returns None: no logits
    """
    if isinstance(layer_or_name, bool) or not isinstance(layer_or_name, (int, str)):
        raise TypeError(f"stop_after: expected a layer index or a hook name, got {layer_or_name!r}")
    name = act_name("resid_post", layer_or_name) if isinstance(layer_or_name, int) else layer_or_name
    return [(name, _stop)]


def run_until(model, input_ids, layer: int, names_filter=None, device=None, **forward_kwargs) -> ActivationCache:
    """Run blocks ``0..layer`` only, caching the selected activations up to ``blocks.{layer}.hook_resid_post``.

    Example::

        cache = run_until(model, ids, layer=1)
        cache["resid_post", 1]
    """
    n = model.cfg.n_layers
    if not isinstance(layer, int) or not -n <= layer < n:
        raise ValueError(f"layer: expected an int in [{-n}, {n}), got {layer!r}")
    layer %= n
    store, cache_hooks = model.cache_hooks(names_filter, device)
    model.run_with_hooks(input_ids, fwd_hooks=cache_hooks + stop_after(layer), **forward_kwargs)
    return ActivationCache(store, model)
