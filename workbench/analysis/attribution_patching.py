"""Attribution patching: every cell of a patching sweep estimated from gradients, verified where it matters.

Exact activation patching (``hooks.patch_sweep``) runs one forward per cell — for Command-R v01 a
``[layer pos head]`` sweep over 200 tokens is 40 × 200 × 64 = 512,000 forwards. Attribution patching
(Nanda 2023; Kramár et al. 2024, "AtP*") replaces each by a first-order estimate::

    metric(corrupted with activation a patched to clean) - metric(corrupted)
        ≈ (a_clean - a_corrupted) · ∂metric/∂a  at the corrupted run

summed over the patched slice. One clean forward, one corrupted forward and one backward give the
gradient at every hook point of the sweep at once (``method="atp"``). ``method="ig"`` integrates the
gradient along the straight path from the corrupted to the clean activation (``steps`` midpoints,
one hook point at a time, the steps batched), which follows the metric's curvature (e.g. a softmax
saturating). The estimates are exact for a metric linear in the patched activation with nothing
nonlinear in between.

Both return the same grid as ``patch_sweep`` for the same ``kind``/``layers``/``positions``/``heads``
(/``neurons``) arguments, **relative to the corrupted run**: ``patch_sweep(...) - metric(corrupted)``.
``verify_top=k`` then patches the k cells with the largest |estimate| exactly (batched) and returns
both.

Example::

    from hooks import logit_diff
    metric = lambda logits: logit_diff(logits, answer=tok_b, wrong=tok_x)
    est = attribution_patching(model, clean_ids, corrupt_ids, metric, kind="z", positions="all")  # [layer pos head]
    res = attribution_patching(model, clean_ids, corrupt_ids, metric, kind="z", verify_top=5)
    res.estimate, res.exact.indices, res.exact.values, res.clean_metric, res.corrupted_metric
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from hooks.ablate import pos_axis
from hooks.patch import DEFAULT, hook_name
from hooks.patch_batched import KIND_ALIASES, KIND_DEFAULT, SweepPlan, patch_cells, plan_sweep


@dataclass
class ExactPatches:
    """Exact patching results for some cells of the grid: ``indices`` ``[k ndim]`` (rows index the
    estimate, as ``torch.argwhere`` gives them), ``values`` ``[k]`` float32, relative to the corrupted run."""

    indices: torch.Tensor
    values: torch.Tensor

    def to_dense(self, shape, fill: float = float("nan")) -> torch.Tensor:
        """A ``shape`` grid holding ``values`` at ``indices`` and ``fill`` elsewhere."""
        out = torch.full(tuple(shape), fill, dtype=torch.float32)
        out[tuple(self.indices.T)] = self.values
        return out


@dataclass
class AttributionPatching:
    """``estimate``: patch_sweep's grid minus the corrupted metric, estimated; ``exact``: the verified
    cells (exact patching, same convention); the clean and corrupted runs' metrics (floats)."""

    estimate: torch.Tensor
    exact: ExactPatches
    clean_metric: float
    corrupted_metric: float
    hook_names: list
    positions: Optional[list]
    units: Optional[list]

    @property
    def error(self) -> torch.Tensor:
        """``estimate - exact`` at the verified cells ``[k]``."""
        return self.estimate[tuple(self.exact.indices.T)] - self.exact.values


def _scalar(value, what: str) -> torch.Tensor:
    value = torch.as_tensor(value)
    if value.numel() != 1:
        raise ValueError(f"attribution_patching: metric must return a scalar, got shape {tuple(value.shape)} "
                         f"({what})")
    return value.reshape(())


def _to_device(model, ids, what: str) -> torch.Tensor:
    ids = torch.as_tensor(ids)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.is_floating_point():
        raise ValueError(f"{what}: expected integer token ids [batch pos], got shape {tuple(ids.shape)}")
    return ids.to(model.device) if model.device.type != "meta" else ids


@contextlib.contextmanager
def _frozen_parameters(model):
    """No parameter gradients for the duration: the backward computes (and saves) only what
    activation gradients need. Flags are restored by name in ``finally`` (accelerate offload swaps
    the parameter objects during a forward)."""
    frozen = [n for n, p in model.named_parameters() if p.requires_grad]
    try:
        for n in frozen:
            model.get_parameter(n).requires_grad_(False)
        yield
    finally:
        for n in frozen:
            model.get_parameter(n).requires_grad_(True)


def _quantized_modules(model) -> list:
    return [(n, m) for n, m in model.named_modules() if "bitsandbytes" in type(m).__module__]


def _check_quantized_backward(model) -> None:
    """Refuse (naming the module) bitsandbytes layers whose kernel has no gradient.

    On a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit layer's weight for its inference kernel
    the first time the layer runs in eval mode on an input without gradient; that kernel has no
    autograd formula, so a backward through it would silently return no gradient."""
    for name, module in _quantized_modules(model):
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError(
                f"attribution_patching: {name!r} ({type(module).__name__}) holds bitsandbytes weights repacked for "
                "its CPU inference kernel, which has no gradient (bitsandbytes repacks on the first no-grad forward "
                "of an eval-mode model on an AVX512-BF16 CPU). Reload the model and call attribution_patching "
                "before any no-grad forward, run on a GPU, load it without quantization_config, or use "
                "hooks.patch_sweep (no gradients)")


def _backward(model, output: torch.Tensor, inputs: list) -> tuple:
    _check_quantized_backward(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            grads = torch.autograd.grad(output, inputs, allow_unused=True)
        except (RuntimeError, NotImplementedError) as e:
            quantized = _quantized_modules(model)
            if quantized:
                raise RuntimeError(f"attribution_patching: the backward pass failed with quantized modules in the "
                                   f"model (first: {quantized[0][0]!r}, {type(quantized[0][1]).__name__}): {e}. Load "
                                   "it without quantization_config, or use hooks.patch_sweep (no gradients)") from e
            raise
    broken = [str(w.message).split(":")[0] for w in caught if "autograd kernel was not registered" in str(w.message)]
    if broken:
        names = ", ".join(repr(n) for n, _ in _quantized_modules(model)[:3]) or "none"
        raise RuntimeError(f"attribution_patching: the backward went through {broken[0]}, which has no gradient "
                           f"(quantized modules: {names}); the estimates would be wrong")
    for w in caught:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return grads


def _differentiable(value: torch.Tensor, logits, what: str) -> None:
    if not value.requires_grad and isinstance(logits, torch.Tensor) and logits.requires_grad:
        raise ValueError(f"attribution_patching: the metric's value on the {what} has no gradient with respect to "
                         "the logits (a .item(), argmax or detach inside it?); use a differentiable metric such as "
                         "hooks.logit_diff")


def _positions_ids(forward_kwargs: dict, n: int, device) -> torch.Tensor:
    pos = forward_kwargs.get("position_ids")
    return torch.arange(n, device=device)[None] if pos is None else torch.as_tensor(pos).to(device)


def _reduce(prod: torch.Tensor, name: str, plan: SweepPlan, position_ids: torch.Tensor) -> torch.Tensor:
    """``delta * grad`` of one hook ``[batch …]`` -> its row of the grid ``[(n_pos) (n_units)]``."""
    pa = pos_axis(name)
    if plan.unit_axis is not None:
        t = prod.movedim((pa, plan.unit_axis), (1, 2))
        t = t.reshape(t.shape[:3] + (-1,)).sum(-1)                               # [batch pos unit]
    else:
        t = prod.movedim(pa, 1).flatten(2).sum(-1)[..., None]                     # [batch pos 1]
    if plan.positions is None:
        t = t.sum(1)                                                              # [batch unit]
    else:                       # positions are absolute (as patch_sweep's), matched through position_ids
        want = torch.tensor(plan.positions, device=t.device)
        onehot = (position_ids.to(t.device)[..., None] == want).to(t.dtype)       # [batch|1 pos n_pos]
        t = torch.einsum("bsu,bsp->bpu", t, onehot.expand(t.shape[0], -1, -1))
    t = t.sum(0)                                                                  # [(n_pos) unit]
    if plan.units is None:
        return t.sum(-1)
    return t[..., torch.tensor(plan.units, device=t.device)]


def _atp(model, corrupted, clean_cache, metric, plan, forward_kwargs):
    acts = {}

    def leaf(x, hook):          # gradients start here, so every later activation is in the graph
        return x.detach().requires_grad_(True)

    def keep(x, hook):
        acts[hook.name] = x

    fwd = [("hook_embed", leaf)] + [(n, keep) for n in plan.hook_names]
    with _frozen_parameters(model), torch.enable_grad():
        logits = model.run_with_hooks(corrupted, fwd_hooks=fwd, **forward_kwargs)
        value = _scalar(metric(logits), "corrupted run")
        _differentiable(value, logits, "corrupted run")
        missing = [n for n in plan.hook_names if n not in acts]
        if missing:
            raise RuntimeError(f"attribution_patching: hooks {missing} did not fire in the corrupted run")
        grads = _backward(model, value, [acts[n] for n in plan.hook_names]) if value.requires_grad else \
            (None,) * len(plan.hook_names)
    position_ids = _positions_ids(forward_kwargs, corrupted.shape[1], "cpu")
    rows = []
    for name, grad in zip(plan.hook_names, grads):
        act = acts[name].detach()
        if grad is None:
            grad = torch.zeros_like(act)
        delta = clean_cache[name].to(act.device).float() - act.float()
        rows.append(_reduce((delta * grad.float()).cpu(), name, plan, position_ids))
    return torch.stack(rows) if rows else torch.zeros(plan.shape), float(value.detach())


def _ig(model, corrupted, clean_cache, metric, plan, steps, batch_size, forward_kwargs):
    batch = corrupted.shape[0]
    position_ids = _positions_ids(forward_kwargs, corrupted.shape[1], "cpu")
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps                 # midpoint rule
    per_forward = max(1, min(steps, batch_size))
    rows = []
    for name in plan.hook_names:
        grad_sum, delta = None, None
        for start in range(0, steps, per_forward):
            a = alphas[start:start + per_forward]
            copies = len(a)
            point = {}

            def interpolate(x, hook, a=a, copies=copies, point=point):
                corr = x.detach()
                clean = clean_cache[hook.name].to(corr.device, torch.float32).repeat((copies,) + (1,) * (x.dim() - 1))
                shape = (-1,) + (1,) * (x.dim() - 1)
                alpha = a.to(corr.device).repeat_interleave(batch).reshape(shape)          # [copies*batch 1 …]
                y = (corr.float() + alpha * (clean - corr.float())).to(x.dtype).requires_grad_(True)
                point["x"], point["corr"] = y, corr[:batch]
                return y

            kwargs = {k: (v.repeat(copies, 1) if k in ("attention_mask",) or (k == "position_ids" and v.shape[0] > 1)
                          else v) for k, v in forward_kwargs.items()}
            with _frozen_parameters(model), torch.enable_grad():
                logits = model.run_with_hooks(corrupted.repeat(copies, 1), fwd_hooks=[(name, interpolate)], **kwargs)
                total = sum(_scalar(metric(logits[r * batch:(r + 1) * batch]), f"IG step of {name}")
                            for r in range(copies))
                _differentiable(total, logits, f"IG steps of {name}")
                if "x" not in point:
                    raise RuntimeError(f"attribution_patching: hook {name!r} did not fire")
                (grad,) = _backward(model, total, [point["x"]]) if total.requires_grad else (None,)
            g = torch.zeros_like(point["x"], dtype=torch.float32) if grad is None else grad.float()
            g = g.reshape((copies, batch) + g.shape[1:]).sum(0)
            grad_sum = g if grad_sum is None else grad_sum + g
            if delta is None:
                delta = clean_cache[name].to(g.device).float() - point["corr"].float()
        rows.append(_reduce((delta * grad_sum / steps).cpu(), name, plan, position_ids))
    return torch.stack(rows) if rows else torch.zeros(plan.shape)


def attribution_patching(model, clean_ids, corrupted_ids, metric: Callable[[torch.Tensor], torch.Tensor],
                         kind: Optional[str] = "z", positions=DEFAULT, heads=DEFAULT, method: str = "atp",
                         steps: Optional[int] = None, verify_top: Optional[int] = None, layers=None,
                         hook_names=None, neurons=DEFAULT, batch_size: int = 16, **forward_kwargs):
    """Estimate every cell of ``hooks.patch_sweep`` at once, relative to the corrupted run.

    Returns float32 with exactly ``patch_sweep``'s shape for the same ``kind``/``hook_names``/``layers``/
    ``positions``/``heads``/``neurons``, holding estimates of ``patch_sweep(...) - metric(corrupted)``
    (0 = no effect). ``kind``: ``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out``, ``z``, ``q``,
    ``k``, ``v`` (``[layer kv_head]`` under GQA, as patch_sweep), ``pattern`` (per head and query
    position), ``mlp_post`` (per neuron), or any hook patch_sweep takes.

    ``method``: ``"atp"`` (clean forward, corrupted forward, one backward: ``Δa · ∂metric/∂a``) or
    ``"ig"`` (integrated gradients along corrupted → clean at each hook point; ``steps`` midpoints,
    default 8, ``batch_size`` of them per forward). ``metric(logits) -> scalar`` must be differentiable
    (e.g. ``hooks.logit_diff``). ``clean_ids``/``corrupted_ids``: ``[batch pos]`` of the same shape.

    ``verify_top=k``: also patch the k cells of largest |estimate| exactly (``batch_size`` per forward)
    and return an ``AttributionPatching`` with ``.estimate``, ``.exact`` (``indices`` ``[k ndim]``,
    ``values`` ``[k]``), ``.clean_metric`` and ``.corrupted_metric``.

    Gradients flow through accelerate offload (the backward keeps each block's weights of the forward
    alive until it is done) and through bitsandbytes layers where their autograd supports it; where
    it does not, the error names the quantized module.

    Example::

        est = attribution_patching(model, clean_ids, corrupt_ids, metric, kind="resid_pre")   # [layer pos]
        res = attribution_patching(model, clean_ids, corrupt_ids, metric, kind="z", positions="all",
                                   method="ig", steps=8, verify_top=10)
        res.exact.values - res.estimate[tuple(res.exact.indices.T)]
    """
    if method not in ("atp", "ig"):
        raise ValueError(f"method: expected 'atp' or 'ig', got {method!r}")
    if steps is not None and (method != "ig" or int(steps) < 1):
        raise ValueError(f"steps: only for method='ig', and >= 1; got steps={steps!r} with method={method!r}")
    if verify_top is not None and int(verify_top) < 1:
        raise ValueError(f"verify_top: expected a positive number of cells, got {verify_top!r}")
    if "kv_cache" in forward_kwargs:
        raise ValueError("attribution_patching: kv_cache= is not supported (both runs need the whole prompt)")
    clean = _to_device(model, clean_ids, "clean_ids")
    corrupted = _to_device(model, corrupted_ids, "corrupted_ids")
    if clean.shape != corrupted.shape:
        raise ValueError(f"clean_ids {tuple(clean.shape)} and corrupted_ids {tuple(corrupted.shape)} need the same "
                         "shape (each position means the same thing in both runs)")
    if hook_names is None:
        if kind is None:
            raise ValueError("attribution_patching: give kind (e.g. 'z') or hook_names")
        kind = KIND_ALIASES.get(kind, kind)
        n_layers = model.cfg.n_layers
        layer_list = range(n_layers) if layers is None else [layer % n_layers for layer in layers]
        hook_names = [hook_name(kind, layer) for layer in layer_list]
    elif isinstance(hook_names, str):
        hook_names = [hook_names]
    hook_names = list(hook_names)
    missing = [n for n in hook_names if n not in model.hook_dict]
    if missing:
        raise ValueError(f"hook_names: {missing} do not exist; model.hook_dict lists the names")
    # A model with bitsandbytes layers runs the clean forward with gradients on: a no-grad forward would
    # make bitsandbytes repack 4-bit CPU weights for a kernel without gradient (_check_quantized_backward).
    quantized = bool(_quantized_modules(model))
    leaf = [("hook_embed", lambda x, hook: x.detach().requires_grad_(True))] if quantized else []
    with torch.enable_grad() if quantized else torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=hook_names, fwd_hooks=leaf,
                                                         **forward_kwargs)
        clean_metric = float(_scalar(metric(clean_logits), "clean run").detach())
    axes = {k: (KIND_DEFAULT if v is DEFAULT else v) for k, v in
            dict(positions=positions, heads=heads, neurons=neurons).items()}
    plan = plan_sweep(model, clean_cache, hook_names, clean.shape[1], **axes)
    if method == "atp":
        estimate, corrupted_metric = _atp(model, corrupted, clean_cache, metric, plan, forward_kwargs)
    else:
        estimate = _ig(model, corrupted, clean_cache, metric, plan, int(steps or 8), batch_size, forward_kwargs)
        corrupted_metric = None
    estimate = estimate.reshape(plan.shape)
    if verify_top is None:
        return estimate
    if corrupted_metric is None:
        with torch.no_grad():   # the same hooks as the exact runs listen to (attention path included)
            logits = model.run_with_hooks(corrupted, fwd_hooks=[(n, lambda x, hook: None) for n in hook_names],
                                          **forward_kwargs)
            corrupted_metric = float(_scalar(metric(logits), "corrupted run"))
    k = min(int(verify_top), estimate.numel())
    flat = estimate.abs().flatten().topk(k).indices
    indices = torch.stack(torch.unravel_index(flat, estimate.shape), dim=1) if estimate.dim() else flat[:, None]
    cells = plan.cells()
    exact = patch_cells(model, corrupted, clean_cache, metric, [cells[i] for i in flat.tolist()], plan.unit_axis,
                        batch_size=batch_size, **forward_kwargs) - corrupted_metric
    return AttributionPatching(estimate=estimate, exact=ExactPatches(indices, exact), clean_metric=clean_metric,
                               corrupted_metric=corrupted_metric, hook_names=plan.hook_names,
                               positions=plan.positions, units=plan.units)
