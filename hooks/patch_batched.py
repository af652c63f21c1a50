"""Batched exact patching: N patched copies of the corrupted prompt in one forward, one patch per copy.

``patch_sweep(..., batch_size=N)`` lands here (and so does any per-neuron sweep). The corrupted prompt
``[batch pos]`` is repeated N times along the batch; rows ``r*batch … (r+1)*batch - 1`` carry cell r's
patch (one hook, one position or all, one head/neuron or all), the other rows of that hook are left
alone, and ``metric`` is called once per copy on its ``[batch pos vocab]`` slice of the logits. Each
value equals the unbatched run's up to float rounding (a batched matrix product may sum in another
order).

Two things make a batch cheaper than N forwards, beyond the wider matrix products:

* a cell starts at its patched position, or — patching all positions — at the first position where the
  clean and corrupted activations of its hook differ (before it, both runs are equal: attention is
  causal); a cell that replaces values by equal ones gets the unpatched metric without a forward;
* cells are ordered by start, so a batch holds cells of (nearly) one start p0, and nothing before p0
  changes: the batch runs only positions ``p0 …`` on top of a KV cache holding the corrupted run's
  keys/values of positions ``< p0``, and the corrupted run's logits are reused for the positions
  before p0 (when ``forward_kwargs`` hold at most an ``attention_mask``; otherwise every row runs the
  whole prompt).

Neuron hooks (``mlp.hook_post``/``hook_pre``/``hook_pre_linear``, kind ``"post"`` or ``"mlp_post"``)
sweep their last axis (``d_mlp``) with ``neurons=``, as per-head hooks sweep heads with ``heads=``.

Example::

    grid = patch_sweep(model, corrupt_ids, clean, metric, kind="z", positions="all", batch_size=16)
    neurons = patch_sweep(model, corrupt_ids, clean, metric, kind="mlp_post", layers=[2])  # [1 neuron]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from workbench.kv_cache import KVCache
from workbench.hook_names import act_name

from .ablate import head_axis, pos_axis, query_positions

# Kind spellings accepted besides the hook-name stems ("post" = "mlp_post", as TransformerLens' users say).
KIND_ALIASES = {"mlp_post": "post", "mlp_pre": "pre", "mlp_pre_linear": "pre_linear"}
_NEURON_HOOKS = ("mlp.hook_post", "mlp.hook_pre", "mlp.hook_pre_linear")
_FORWARD_KWARGS_WITH_PREFIX = {"attention_mask"}   # kwargs the KV-prefix shortcut knows how to split


class _Sentinel:
    def __repr__(self) -> str:
        return "<kind default>"


KIND_DEFAULT = _Sentinel()


def neuron_axis(name: str) -> Optional[int]:
    """Axis of MLP neurons (``d_mlp``) for hook ``name``, or None."""
    return 2 if name.endswith(_NEURON_HOOKS) else None


def sweep_values(value, n: int, what: str) -> Optional[list]:
    """None -> None; ``"all"`` -> ``[0 … n-1]``; an int or ints (negative count from the end) -> a list."""
    if value is None:
        return None
    if isinstance(value, str):
        if value != "all":
            raise ValueError(f"{what}: expected None, 'all' or a list of indices, got {value!r}")
        return list(range(n))
    values = [value] if isinstance(value, int) else [int(v) for v in value]
    bad = [v for v in values if not -n <= v < n]
    if bad:
        raise ValueError(f"{what}: {bad} out of range for size {n}")
    return [v % n for v in values]


@dataclass
class SweepPlan:
    """What a sweep patches: axes ``[hook (pos) (unit)]`` and the cells in row-major order.

    ``positions``/``units``: the swept positions / heads or neurons (None: all of them at once);
    ``unit``: "heads", "neurons" or None; ``unit_axis``: that axis in the hooks' tensors.
    """

    hook_names: list
    positions: Optional[list]
    units: Optional[list]
    unit: Optional[str]
    unit_axis: Optional[int]

    @property
    def shape(self) -> tuple:
        return (len(self.hook_names),) + ((len(self.positions),) if self.positions is not None else ()) \
            + ((len(self.units),) if self.units is not None else ())

    def cells(self) -> list:
        """``(hook_name, position or None, unit or None)`` for every output cell, row-major."""
        return [(name, p, u) for name in self.hook_names for p in (self.positions or [None])
                for u in (self.units or [None])]


def plan_sweep(model, clean_cache, hook_names: list, n_pos: int, positions=KIND_DEFAULT, heads=KIND_DEFAULT,
               neurons=KIND_DEFAULT) -> SweepPlan:
    """Check ``hook_names`` against the model and ``clean_cache``; resolve the swept axes.

    Defaults (TransformerLens' habit): positions swept for plain hooks (``[layer pos]``), heads for
    per-head hooks (``[layer head]``), neurons for MLP neuron hooks (``[layer neuron]``).

    Example::

        plan = plan_sweep(model, clean, ["blocks.0.attn.hook_z"], n_pos=12, positions="all")
        plan.shape                                  # (1, 12, n_heads)
    """
    known = model.hook_dict
    for name in hook_names:
        if name not in known:
            raise ValueError(f"hook {name!r} does not exist; model.hook_dict lists the names")
        if name not in clean_cache:
            raise KeyError(f"{name!r} is not in clean_cache; cache it in the clean run (names_filter)")
    kinds = {("heads" if head_axis(n) is not None else "neurons" if neuron_axis(n) is not None else None)
             for n in hook_names}
    if len(kinds) > 1:
        raise ValueError("patch_sweep: sweep hooks with heads, with neurons and with neither separately")
    unit = kinds.pop() if kinds else None
    first = hook_names[0] if hook_names else None
    unit_axis = None if first is None else head_axis(first) if unit == "heads" else neuron_axis(first)
    if positions is KIND_DEFAULT:
        positions = "all" if unit is None else None
    for what, value, own in (("heads", heads, "heads"), ("neurons", neurons, "neurons")):
        if value is not KIND_DEFAULT and value is not None and unit != own:
            raise ValueError(f"{what}=: {first!r} has no {'head' if own == 'heads' else 'neuron'} axis")
    chosen = heads if unit == "heads" else neurons if unit == "neurons" else None
    if chosen is KIND_DEFAULT:
        chosen = "all"
    units = None
    if chosen is not None and unit is not None:
        units = sweep_values(chosen, clean_cache[first].shape[unit_axis], unit)
    return SweepPlan(list(hook_names), sweep_values(positions, n_pos, "positions"), units, unit, unit_axis)


def _k_name(model, layer: int) -> str:
    # the keys the KV cache stores: after QK-norm and rotary where the layer has them
    for kind in ("rot_k", "k_normed", "k"):
        name = act_name(kind, layer)
        if name in model.hook_dict:
            return name
    raise ValueError(f"layer {layer} has no key hook")


def _corrupted_prefix(model, tokens: torch.Tensor, forward_kwargs: dict, names: list):
    """One corrupted forward: its logits, every layer's cached keys/values ``[batch pos kv_head d_head]``
    and the activations of ``names``."""
    n_layers = model.cfg.n_layers
    store = {}

    def keep(x, hook):
        store[hook.name] = x.detach()

    kv = [_k_name(model, i) for i in range(n_layers)] + [act_name("v", i) for i in range(n_layers)]
    listen = list(dict.fromkeys(kv + list(names)))
    logits = model.run_with_hooks(tokens, fwd_hooks=[(n, keep) for n in listen], **forward_kwargs)
    keys = [store[_k_name(model, i)] for i in range(n_layers)]
    values = [store[act_name("v", i)] for i in range(n_layers)]
    return logits, keys, values, {n: store[n] for n in names}


def _first_change(clean: torch.Tensor, corrupted: torch.Tensor, name: str) -> int:
    """First position where the clean and corrupted activations differ (their length if nowhere): a patch
    before it replaces a value by the same value."""
    if clean.shape != corrupted.shape:
        raise ValueError(f"{name}: clean activation {tuple(clean.shape)} does not match the corrupted "
                         f"{tuple(corrupted.shape)}; clean and corrupted prompts need the same shape")
    pa = pos_axis(name)
    differs = (clean.to(corrupted.device) != corrupted).movedim(pa, 0).reshape(corrupted.shape[pa], -1).any(1)
    hits = differs.nonzero()
    return int(hits[0]) if len(hits) else corrupted.shape[pa]


def _prefilled_cache(model, keys: list, values: list, p0: int, copies: int) -> KVCache:
    """A KV cache holding positions ``< p0`` of the corrupted run, repeated ``copies`` times."""
    cache = KVCache.for_model(model)
    for i, (k, v) in enumerate(zip(keys, values)):
        k = k[:, :p0].transpose(1, 2).repeat(copies, 1, 1, 1)                    # [batch kv_head pos d_head]
        v = v[:, :p0].transpose(1, 2).repeat(copies, 1, 1, 1)
        cache.update(i, k, v)
    cache.advance(p0)
    return cache


def _patch_rows(source: torch.Tensor, cell_pos: torch.Tensor, cell_unit: torch.Tensor, hit: torch.Tensor,
                unit_axis: Optional[int], copies: int, p0: int):
    """``fn(x, hook)``: rows of copy r take ``source`` where copy r's cell selects (``hit[r]``).

    ``cell_pos``/``cell_unit`` ``[copies]``: absolute position / head or neuron of each copy's cell
    (-1 = all); ``source`` is the clean activation ``[batch …]``, sliced to positions ``p0 …``.
    """
    def fn(x: torch.Tensor, hook) -> torch.Tensor:
        pa = pos_axis(hook.name)
        src = source.narrow(pa, p0, source.shape[pa] - p0) if p0 else source
        batch = src.shape[0]
        if src.shape[1:] != x.shape[1:] or batch * copies != x.shape[0]:
            raise ValueError(f"{hook.name}: clean activation {tuple(src.shape)} does not fit the batched "
                             f"corrupted {tuple(x.shape)}; clean and corrupted prompts need the same shape")
        src = src.to(x.device, x.dtype).repeat((copies,) + (1,) * (x.dim() - 1))
        row_cell = torch.arange(copies, device=x.device).repeat_interleave(batch)          # [copies*batch]
        pos = cell_pos.to(x.device)[row_cell]
        qpos = query_positions(hook, x.shape[pa], x.device)                               # [batch|1 pos]
        pm = ((qpos == pos[:, None]) | (pos[:, None] < 0)) & hit.to(x.device)[row_cell][:, None]
        shape = [1] * x.dim()
        shape[0], shape[pa] = pm.shape
        mask = pm.reshape(shape)
        if unit_axis is not None:
            unit = cell_unit.to(x.device)[row_cell]
            um = (torch.arange(x.shape[unit_axis], device=x.device) == unit[:, None]) | (unit[:, None] < 0)
            shape = [1] * x.dim()
            shape[0], shape[unit_axis] = um.shape
            mask = mask & um.reshape(shape)
        return torch.where(mask, src, x)

    return fn


def _metric_value(metric: Callable, logits) -> torch.Tensor:
    value = torch.as_tensor(metric(logits))
    if value.numel() != 1:
        raise ValueError(f"patch_sweep: metric must return a scalar, got shape {tuple(value.shape)}")
    return value


def _prefix_ok(forward_kwargs: dict) -> bool:
    return set(forward_kwargs) <= _FORWARD_KWARGS_WITH_PREFIX


@torch.no_grad()
def patch_cells(model, corrupted_tokens: torch.Tensor, clean_cache, metric: Callable, cells: list,
                unit_axis: Optional[int] = None, batch_size: int = 16, progress: bool = False,
                reuse_prefix: bool = True, **forward_kwargs) -> torch.Tensor:
    """Metric of the corrupted run with each cell patched from ``clean_cache``: float32 ``[n_cells]``.

    ``cells``: ``(hook_name, position or None, unit or None)`` (``SweepPlan.cells()``); ``unit_axis``:
    the axis a unit indexes (heads or neurons). ``batch_size`` copies run per forward.

    Example::

        patch_cells(model, corrupt_ids, clean, metric, [("blocks.1.attn.hook_z", None, 2)], unit_axis=2)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
    if "kv_cache" in forward_kwargs:
        raise ValueError("patch_sweep: kv_cache= cannot be combined with batched patching")
    tokens = torch.as_tensor(corrupted_tokens)
    if model.device.type != "meta":                           # meta = accelerate offload moves inputs itself
        tokens = tokens.to(model.device)
    batch, n = tokens.shape
    prefix = reuse_prefix and _prefix_ok(forward_kwargs)
    # With the prefix shortcut, a cell starts where its patch first changes anything: its position, and
    # never before the first position where clean and corrupted differ at that hook (attention is causal,
    # so earlier positions are equal in both runs). Cells that change nothing get the unpatched metric.
    start = {c: 0 for c in range(len(cells))}
    noop = set()
    if prefix:
        names = list(dict.fromkeys(cell[0] for cell in cells))
        base_logits, keys, values, corrupted = _corrupted_prefix(model, tokens, forward_kwargs, names)
        first = {name: _first_change(clean_cache[name], corrupted[name], name) for name in names}
        for c, (name, p, _) in enumerate(cells):
            start[c] = first[name] if p is None else p
            if (p is None and first[name] >= n) or (p is not None and p < first[name]):
                noop.add(c)
    order = sorted((c for c in range(len(cells)) if c not in noop), key=lambda c: start[c])
    out = torch.empty(len(cells), dtype=torch.float32)
    if noop:
        out[sorted(noop)] = float(_metric_value(metric, base_logits))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc="patch_sweep", initial=len(noop))
    for i0 in range(0, len(order), batch_size):
        chunk = order[i0:i0 + batch_size]
        copies = len(chunk)
        p0 = min(start[c] for c in chunk)
        kwargs = {k: v.repeat(copies, 1) if k == "attention_mask" or (k == "position_ids" and v.shape[0] > 1) else v
                  for k, v in forward_kwargs.items()}
        if p0:
            kwargs["kv_cache"] = _prefilled_cache(model, keys, values, p0, copies)
        cell_pos = torch.tensor([-1 if cells[c][1] is None else cells[c][1] for c in chunk])
        cell_unit = torch.tensor([-1 if cells[c][2] is None else cells[c][2] for c in chunk])
        fwd = []
        for name in dict.fromkeys(cells[c][0] for c in chunk):
            hit = torch.tensor([cells[c][0] == name for c in chunk])
            fwd.append((name, _patch_rows(clean_cache[name], cell_pos, cell_unit, hit, unit_axis, copies, p0)))
        logits = model.run_with_hooks(tokens[:, p0:].repeat(copies, 1), fwd_hooks=fwd, **kwargs)
        if p0 and logits is not None:
            head = base_logits[:, :p0].to(logits.device).repeat(copies, 1, 1)
            logits = torch.cat([head, logits], dim=1)                         # [copies*batch pos vocab]
        for r, c in enumerate(chunk):
            out[c] = float(_metric_value(metric, None if logits is None else logits[r * batch:(r + 1) * batch]))
        if bar is not None:
            bar.update(copies)
    if bar is not None:
        bar.close()
    return out


def batched_sweep(model, corrupted_tokens: torch.Tensor, clean_cache, metric: Callable, hook_names: list,
                  batch_size: int = 16, progress: bool = False, positions=KIND_DEFAULT, heads=KIND_DEFAULT,
                  neurons=KIND_DEFAULT, **forward_kwargs) -> torch.Tensor:
    """``patch_sweep`` for resolved ``hook_names``, ``batch_size`` patched copies per forward.

    Returns float32 ``[n_hooks (n_pos) (n_heads | n_neurons)]``, the same grid as the unbatched sweep.

    Example::

        grid = batched_sweep(model, corrupt_ids, clean, metric, ["blocks.0.hook_resid_pre"], batch_size=16)
    """
    tokens = torch.as_tensor(corrupted_tokens)
    plan = plan_sweep(model, clean_cache, hook_names, tokens.shape[1], positions, heads, neurons)
    values = patch_cells(model, tokens, clean_cache, metric, plan.cells(), plan.unit_axis, batch_size,
                         progress, **forward_kwargs)
    return values.reshape(plan.shape)
