"""Activation patching from a clean run into a corrupted one (TransformerLens' patching habit).

Example::

    from hooks import patch_resid, patch_sweep, logit_diff

    _, clean = model.run_with_cache(clean_ids, names_filter=lambda n: n.endswith("resid_pre"))
    logits = model.run_with_hooks(corrupt_ids, fwd_hooks=patch_resid(clean, layer=2, positions=[4]))

    metric = lambda logits: logit_diff(logits, answer=paris, wrong=rome)
    grid = patch_sweep(model, corrupt_ids, clean, metric, kind="resid_pre")     # [layer pos]
    grid = patch_sweep(model, corrupt_ids, clean, metric, kind="z")             # [layer head]
    grid = patch_sweep(model, corrupt_ids, clean, metric, kind="z", positions="all")   # [layer pos head]

Exactness: patching a whole activation reproduces the clean run bit for bit only if both runs take
the same attention path — a cache made with ``names_filter=None`` listens to ``hook_pattern`` and
``hook_result``, which switch to the explicit path and the per-head sum; cache only what you patch.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from workbench.hook_names import act_name, head_axis
from .patch_batched import KIND_ALIASES, KIND_DEFAULT, batched_sweep, neuron_axis  # attrib (issue 18)

from .ablate import Index, lookup, replace


def hook_name(kind: str, layer: int) -> str:
    """``("z", 3)`` -> ``"blocks.3.attn.hook_z"``; ``("resid_pre", 0)`` -> ``"blocks.0.hook_resid_pre"``.

    The hook vocabulary's ``act_name`` for a block hook (a ValueError names the known kinds)."""
    if layer is None:
        raise ValueError(f"kind {kind!r}: patching needs a layer")
    return act_name(kind, layer)


def patch_from(clean, heads: Index = None, positions: Index = None):
    """``fn(x, hook)`` replacing the selected part of ``x`` by ``clean[hook.name]``.

    ``clean``: an ``ActivationCache``/dict from the clean run (same shapes), or a tensor.

    Example::

        fwd = [("blocks.1.attn.hook_z", patch_from(clean, heads=[2], positions=[5]))]
    """
    def fn(x: torch.Tensor, hook) -> torch.Tensor:
        src = lookup(clean, hook)
        if src.shape != x.shape:
            raise ValueError(f"{hook.name}: clean activation {tuple(src.shape)} does not match the corrupted "
                             f"{tuple(x.shape)}; clean and corrupted prompts need the same shape")
        return replace(x, src, hook, heads, positions)

    return fn


def patch_resid(clean, layer: int, positions: Index = None, kind: str = "resid_pre") -> list:
    """``[(name, fn)]`` patching the residual stream (``resid_pre`` or ``resid_post``) of ``layer``."""
    if kind not in ("resid_pre", "resid_post"):
        raise ValueError(f"kind: expected 'resid_pre' or 'resid_post', got {kind!r}")
    return [(hook_name(kind, layer), patch_from(clean, positions=positions))]


def patch_heads(clean, layer: int, heads: Index, positions: Index = None, kind: str = "z") -> list:
    """``[(name, fn)]`` patching attention ``heads`` of ``layer`` (on ``hook_z`` by default)."""
    return [(hook_name(kind, layer), patch_from(clean, heads=heads, positions=positions))]


def patch_mlp(clean, layer: int, positions: Index = None) -> list:
    """``[(name, fn)]`` patching ``layer``'s MLP output."""
    return [(hook_name("mlp_out", layer), patch_from(clean, positions=positions))]


def logit_diff(logits: torch.Tensor, answer, wrong, position: int = -1, reduce: str = "mean") -> torch.Tensor:
    """``logits[:, position, answer] - logits[:, position, wrong]`` (float32), averaged over the batch.

    ``answer``/``wrong``: an int or LongTensor ``[batch]``; ``reduce``: "mean" or "none".

    Example::

        metric = lambda logits: logit_diff(logits, answer=paris, wrong=rome)
    """
    if logits is None:
        raise ValueError("logit_diff: logits is None (did a hook raise StopForward?)")
    last = logits[:, position].float()                                    # [batch vocab]
    rows = torch.arange(last.shape[0], device=last.device)
    a = torch.as_tensor(answer, device=last.device).long().expand(last.shape[0])
    w = torch.as_tensor(wrong, device=last.device).long().expand(last.shape[0])
    diff = last[rows, a] - last[rows, w]
    if reduce == "none":
        return diff
    if reduce != "mean":
        raise ValueError(f"reduce: expected 'mean' or 'none', got {reduce!r}")
    return diff.mean()


class _Default:
    def __repr__(self) -> str:
        return "<kind default>"


DEFAULT = _Default()


def _sweep_values(value, n: int, what: str) -> Optional[list]:
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


@torch.no_grad()
def patch_sweep(model, corrupted_tokens: torch.Tensor, clean_cache, metric: Callable[[torch.Tensor], torch.Tensor],
                hook_names: Union[None, str, list] = None, kind: Optional[str] = None, layers=None,
                positions=DEFAULT, heads=DEFAULT, progress: bool = False, batch_size: int = 1,
                neurons=DEFAULT, **forward_kwargs) -> torch.Tensor:
    """Patch one clean activation slice at a time into the corrupted run; the metric of each run.

    Swept axes, in order: the hooks (``hook_names``, or ``kind`` at every layer of ``layers``),
    then ``positions`` (``"all"`` or a list; None = all positions at once), then ``heads`` (same).
    Defaults follow TransformerLens: positions swept for headless kinds (``resid_pre``, ``mlp_out``…
    -> ``[layer pos]``), heads swept for per-head kinds (``z``, ``pattern``… -> ``[layer head]``).
    ``metric(logits) -> scalar``. Returns float32 ``[n_hooks (n_pos) (n_heads)]``.

    MLP neuron hooks (kind ``"mlp_post"``/``"post"``, ``"pre"``, ``"pre_linear"``) sweep ``neurons``
    (default all, positions at once: ``[layer neuron]``). ``batch_size=N`` runs N patched copies of
    the corrupted prompt per forward (hooks/patch_batched.py): the same grid up to float rounding.

    Example::

        grid = patch_sweep(model, corrupt_ids, clean, lambda l: logit_diff(l, 5, 7), kind="mlp_out",
                           positions=None)                             # [layer]
        grid = patch_sweep(model, corrupt_ids, clean, metric, kind="z", positions="all", batch_size=16)
    """
    kind = KIND_ALIASES.get(kind, kind)                       # attrib (issue 18): "mlp_post" = "post"
    corrupted_tokens = torch.as_tensor(corrupted_tokens)
    if model.device.type != "meta":                           # meta = accelerate offload moves inputs itself
        corrupted_tokens = corrupted_tokens.to(model.device)
    if hook_names is None:
        if kind is None:
            raise ValueError("patch_sweep: give hook_names or kind (e.g. kind='resid_pre')")
        L = model.cfg.n_layers
        layers = range(L) if layers is None else [layer % L for layer in layers]
        hook_names = [hook_name(kind, layer) for layer in layers]
    elif isinstance(hook_names, str):
        hook_names = [hook_names]
    hook_names = list(hook_names)
    # ---- attrib (issue 18): batched and per-neuron sweeps run in hooks/patch_batched.py ----
    if batch_size != 1 or neurons is not DEFAULT or any(neuron_axis(n) is not None for n in hook_names):
        axes = {k: (KIND_DEFAULT if v is DEFAULT else v)
                for k, v in dict(positions=positions, heads=heads, neurons=neurons).items()}
        return batched_sweep(model, corrupted_tokens, clean_cache, metric, hook_names, batch_size=batch_size,
                             progress=progress, **axes, **forward_kwargs)
    # ---- end attrib ----
    for name in hook_names:
        model.resolve_hooks(name)                                # unknown names raise before any run
        if name not in clean_cache:
            raise KeyError(f"{name!r} is not in clean_cache; cache it in the clean run (names_filter)")
    axes = {head_axis(n) for n in hook_names}
    if len(axes) > 1:
        raise ValueError("patch_sweep: mix hooks with and without a head axis in separate sweeps")
    has_heads = axes.pop() is not None
    n_pos = corrupted_tokens.shape[1]
    pos_list = _sweep_values(("all" if not has_heads else None) if positions is DEFAULT else positions, n_pos,
                             "positions")
    head_list = None
    if heads is DEFAULT and has_heads:
        heads = "all"
    if heads is not DEFAULT and heads is not None:
        if not has_heads:
            raise ValueError(f"heads=: {hook_names[0]!r} has no head axis")
        n_heads = clean_cache[hook_names[0]].shape[head_axis(hook_names[0])]
        head_list = _sweep_values(heads, n_heads, "heads")
    shape = [len(hook_names)] + ([len(pos_list)] if pos_list is not None else []) \
        + ([len(head_list)] if head_list is not None else [])
    out = torch.empty(shape, dtype=torch.float32)
    cells = [((i,) + ((j,) if p is not None else ()) + ((k,) if h is not None else ()), i, p, h)
             for i in range(len(hook_names))
             for j, p in enumerate(pos_list or [None]) for k, h in enumerate(head_list or [None])]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc="patch_sweep")
    for index, i, p, h in cells:
        fn = patch_from(clean_cache, heads=None if h is None else [h], positions=None if p is None else [p])
        logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(hook_names[i], fn)], **forward_kwargs)
        value = torch.as_tensor(metric(logits))
        if value.numel() != 1:
            raise ValueError(f"patch_sweep: metric must return a scalar, got shape {tuple(value.shape)}")
        out[index] = float(value)
        if bar is not None:
            bar.update()
    if bar is not None:
        bar.close()
    return out
