"""Ablation recipes: zero, mean or resample an activation — whole, per head, per position.

Positions are ABSOLUTE positions, read from ``hook.ctx.positions`` (so they keep their meaning in
cached generation). Heads select the head axis of ``hook_q/k/v/z/result`` (axis 2; on ``hook_k``/
``hook_v`` that is a key/value head) and of ``hook_pattern``/``hook_attn_scores`` (axis 1, where
positions select QUERY positions). Hooking ``hook_pattern`` makes that layer use the explicit
attention path instead of the fused one (the fused kernel never materialises the pattern).

Example::

    from hooks import zero_ablate, mean_ablate, resample_ablate, ablate_heads

    model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", zero_ablate(heads=[3]))])
    _, ref = model.run_with_cache(reference_ids)
    model.run_with_hooks(ids, fwd_hooks=ablate_heads({1: [3], 2: [0, 5]}, how="mean", source=ref))
"""

from __future__ import annotations

import numbers
from typing import Iterable, Optional, Union

import torch

from workbench.activation_cache import ActivationCache
from workbench.hook_names import act_name, head_axis, pos_axis

from .record import accumulate

Index = Union[None, int, Iterable[int], torch.Tensor]
__all__ = ["Index", "ablate_heads", "compute_means", "head_axis", "lookup", "to_index", "mean_ablate", "pos_axis",
           "query_positions", "replace", "resample_ablate", "selection_mask", "zero_ablate"]


def to_index(values: Index, what: str) -> Optional[torch.Tensor]:
    """None, an int, an iterable of ints or an integer tensor -> LongTensor [n] of non-negative indices."""
    if values is None:
        return None
    if isinstance(values, torch.Tensor):
        ok = not (values.is_floating_point() or values.is_complex() or values.dtype == torch.bool) and values.dim() <= 1
        t = values.reshape(-1).long() if ok else None
    else:
        items = [values] if isinstance(values, numbers.Integral) else list(values)
        ok = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in items)
        t = torch.tensor(items, dtype=torch.long) if ok else None
    if t is None or isinstance(values, bool):
        raise ValueError(f"{what}: expected an int or a list of ints, got {values!r}")
    if (t < 0).any():
        raise ValueError(f"{what}: must be >= 0 (absolute indices), got {t.tolist()}")
    return t


def query_positions(hook, n: int, device) -> torch.Tensor:
    """Absolute positions ``[batch|1, n]`` of the tensor's ``n`` (query) positions."""
    pos = hook.ctx.positions
    if pos is None or pos.shape[-1] != n:
        pos = torch.arange(hook.ctx.past_len, hook.ctx.past_len + n)[None]
    return pos.to(device)


def selection_mask(x: torch.Tensor, hook, heads: Index = None, positions: Index = None) -> Optional[torch.Tensor]:
    """Bool mask broadcastable to ``x`` selecting ``heads`` × ``positions`` (None: the whole tensor)."""
    mask = None
    if positions is not None:
        pa = pos_axis(hook.name)
        want = to_index(positions, "positions").to(x.device)
        pm = torch.isin(query_positions(hook, x.shape[pa], x.device), want)        # [batch|1 pos]
        shape = [1] * x.dim()
        shape[0], shape[pa] = pm.shape[0], pm.shape[1]
        mask = pm.reshape(shape)
    if heads is not None:
        ha = head_axis(hook.name)
        if ha is None:
            raise ValueError(f"heads= given but {hook.name!r} has no head axis; use hook_z, hook_pattern, "
                             "hook_result, hook_q/k/v")
        idx = to_index(heads, "heads")
        if (idx >= x.shape[ha]).any():
            raise ValueError(f"heads: {idx.tolist()} out of range for {hook.name!r} with {x.shape[ha]} heads")
        hm = torch.zeros(x.shape[ha], dtype=torch.bool, device=x.device)
        hm[idx.to(x.device)] = True
        shape = [1] * x.dim()
        shape[ha] = x.shape[ha]
        hm = hm.reshape(shape)
        mask = hm if mask is None else mask & hm
    return mask


def replace(x: torch.Tensor, new: torch.Tensor, hook, heads: Index = None, positions: Index = None) -> torch.Tensor:
    """``x`` with the selected part taken from ``new`` (broadcastable to ``x``)."""
    new = new.to(x.device, x.dtype)
    try:
        torch.broadcast_shapes(new.shape, x.shape)
    except RuntimeError:
        raise ValueError(f"{hook.name}: replacement of shape {tuple(new.shape)} does not fit the activation "
                         f"{tuple(x.shape)}") from None
    mask = selection_mask(x, hook, heads, positions)
    if mask is None:
        return new.expand(x.shape).clone()
    return torch.where(mask, new, x)


def lookup(source, hook) -> torch.Tensor:
    if isinstance(source, torch.Tensor):
        return source
    try:
        return source[hook.name]
    except KeyError:
        raise KeyError(f"{hook.name!r} is not in the ablation source; cache it (names_filter)") from None


def zero_ablate(heads: Index = None, positions: Index = None):
    """``fn(x, hook)`` setting the selected part to zero.

    Example::

        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_mlp_out", zero_ablate(positions=[3]))])
    """
    def fn(x: torch.Tensor, hook) -> torch.Tensor:
        mask = selection_mask(x, hook, heads, positions)
        return torch.zeros_like(x) if mask is None else x.masked_fill(mask, 0)

    return fn


def _mean_of(t: torch.Tensor, name: str, over: str) -> torch.Tensor:
    if over == "batch":
        return t.float().mean(0, keepdim=True)
    return t.float().mean((0, pos_axis(name)), keepdim=True)


def mean_ablate(means, heads: Index = None, positions: Index = None, over: str = "batch"):
    """``fn(x, hook)`` replacing the selected part by a mean activation.

    ``means``: a tensor broadcastable to the activation; a dict hook name -> mean (e.g. from
    :func:`compute_means`); or an ``ActivationCache`` of reference prompts, averaged over ``over``
    = "batch" (keeps positions: needs the same length) or "batch_pos".

    Example::

        _, ref = model.run_with_cache(reference_ids)
        model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", mean_ablate(ref, heads=[2]))])
    """
    if over not in ("batch", "batch_pos"):
        raise ValueError(f"over: expected 'batch' or 'batch_pos', got {over!r}")
    memo: dict = {}

    def fn(x: torch.Tensor, hook) -> torch.Tensor:
        if isinstance(means, ActivationCache):
            if hook.name not in memo:
                memo[hook.name] = _mean_of(lookup(means, hook), hook.name, over)
            m = memo[hook.name]
        else:
            m = lookup(means, hook)
        return replace(x, m, hook, heads, positions)

    return fn


def compute_means(model, dataset, names, over: str = "batch_pos", **forward_kwargs) -> dict:
    """Mean activation of each hook in ``names`` over a dataset of prompts: name -> float32 tensor.

    ``dataset``: input ids ``[n pos]`` or an iterable of ``[batch pos]`` tensors (e.g. batches of
    different lengths with ``over="batch_pos"``). ``over="batch"`` keeps positions.

    Example::

        means = compute_means(model, reference_batches, ["blocks.1.attn.hook_z"])
        fwd = [("blocks.1.attn.hook_z", mean_ablate(means, heads=[2]))]
    """
    if over not in ("batch", "batch_pos"):
        raise ValueError(f"over: expected 'batch' or 'batch_pos', got {over!r}")
    batches = [dataset] if isinstance(dataset, torch.Tensor) else list(dataset)
    names = [names] if isinstance(names, str) else list(names)
    accs = {}
    hooks = []
    for name in names:
        dims = (0,) if over == "batch" else (0, pos_axis(name))
        accs[name], pairs = accumulate(name, dims=dims)
        hooks += pairs
    with torch.no_grad():
        for batch in batches:
            model.run_with_hooks(batch, fwd_hooks=hooks, **forward_kwargs)
    return {name: acc.mean(name) for name, acc in accs.items()}


def resample_ablate(source, heads: Index = None, positions: Index = None,
                    generator: Optional[torch.Generator] = None):
    """``fn(x, hook)`` replacing the selected part with the same activation from other prompts.

    ``source``: an ``ActivationCache`` (or dict) from ``model.run_with_cache(other_ids)``, same
    sequence length. Row i of the batch takes source row i, or — with ``generator`` — a source
    row drawn at random (with replacement) on every call.

    Example::

        _, other = model.run_with_cache(other_ids)
        g = torch.Generator().manual_seed(0)
        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", resample_ablate(other, heads=[1], generator=g))])
    """
    def fn(x: torch.Tensor, hook) -> torch.Tensor:
        src = lookup(source, hook)
        if generator is not None:
            rows = torch.randint(0, src.shape[0], (x.shape[0],), generator=generator)
        elif src.shape[0] in (1, x.shape[0]):
            rows = torch.arange(x.shape[0]) if src.shape[0] == x.shape[0] else torch.zeros(x.shape[0], dtype=torch.long)
        else:
            raise ValueError(f"{hook.name}: source batch {src.shape[0]} != batch {x.shape[0]}; pass generator= "
                             "to draw source rows at random")
        src = src[rows.to(src.device)]
        if src.shape != x.shape:
            raise ValueError(f"{hook.name}: source activation {tuple(src.shape)} does not match {tuple(x.shape)} "
                             "(same sequence length needed)")
        return replace(x, src, hook, heads, positions)

    return fn


def ablate_heads(heads, how: str = "zero", source=None, hook: str = "z", positions: Index = None,
                 generator: Optional[torch.Generator] = None) -> list:
    """``[(name, fn)]`` ablating attention heads: ``heads`` is ``{layer: [head, ...]}`` or ``[(layer, head), ...]``.

    ``how``: "zero", "mean" (``source`` = cache/dict of means) or "resample" (``source`` = cache);
    ``hook``: "z" (default), "pattern", "result", "q", "v", ... of each layer's attention.

    Example::

        model.run_with_hooks(ids, fwd_hooks=ablate_heads([(0, 1), (1, 3)]))
    """
    if isinstance(heads, dict):
        by_layer = {int(layer): list(hs) if not isinstance(hs, int) else [hs] for layer, hs in heads.items()}
    else:
        by_layer = {}
        for layer, head in heads:
            by_layer.setdefault(int(layer), []).append(int(head))
    if how not in ("zero", "mean", "resample"):
        raise ValueError(f"how: expected 'zero', 'mean' or 'resample', got {how!r}")
    if how != "zero" and source is None:
        raise ValueError(f"how={how!r} needs source= (an ActivationCache or dict of activations)")
    pairs = []
    for layer, hs in sorted(by_layer.items()):
        if how == "zero":
            fn = zero_ablate(heads=hs, positions=positions)
        elif how == "mean":
            fn = mean_ablate(source, heads=hs, positions=positions)
        else:
            fn = resample_ablate(source, heads=hs, positions=positions, generator=generator)
        pairs.append((act_name(hook, layer, "attn"), fn))
    return pairs


# The names these helpers had before they were public, for code written against them (e.g. other branches).
_index, _lookup = to_index, lookup
