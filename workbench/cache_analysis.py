"""Residual-stream analyses over an activation cache (TransformerLens' cache methods, as functions).

Each function takes a cache (``ActivationCache``: ``cache[name]``, ``name in cache``, ``cache.model``,
``cache.n_layers``) and returns tensors; ``ActivationCache`` exposes them as methods of the same
names, and ``workbench.analysis`` re-exports them. Weights are read with ``weights.model_weight``,
so they work under accelerate offload.

Command-R's block is parallel (one LayerNorm feeds attention and MLP), so there is no
``resid_mid``: ``resid_post[l] = resid_pre[l] + attn_out[l] + mlp_out[l]``.

Example::

    resid, labels = accumulated_resid(cache, pos_slice=-1)        # [n_resid batch d_model]
    parts, labels = decompose_resid(cache, pos_slice=-1)          # embed, attn_out 0, mlp_out 0, ...
    heads, labels = stack_head_results(cache, pos_slice=-1)       # [layer*head batch d_model], "L0H0", ...
    attrs = logit_attrs(cache, parts, tokens=answer, pos_slice=-1)   # [component batch]
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from einops import rearrange

from .hook_names import act_name, block_name
from .norms import layer_norm_fp32
from .weights import model_weight, per_head_result

PosSlice = Union[None, int, slice, list, tuple, torch.Tensor]

__all__ = ["PosSlice", "accumulated_resid", "apply_ln_to_stack", "decompose_resid", "head_results", "logit_attrs",
           "slice_pos", "stack_head_results"]


def slice_pos(t: torch.Tensor, pos_slice: PosSlice, axis: int = 1) -> torch.Tensor:
    """Select positions on ``axis``: None = all, an int drops the axis, a slice / list / LongTensor keeps it."""
    if pos_slice is None:
        return t
    if isinstance(pos_slice, int):
        return t.select(axis, pos_slice)
    if isinstance(pos_slice, slice):
        return t[(slice(None),) * (axis % t.dim()) + (pos_slice,)]
    idx = torch.as_tensor(pos_slice, dtype=torch.long, device=t.device)
    if idx.dim() != 1:
        raise ValueError(f"pos_slice: expected an int, a slice or a 1-D list of positions, "
                         f"got shape {tuple(idx.shape)}")
    return t.index_select(axis, idx % t.shape[axis])


def _need_model(cache, what: str):
    if cache.model is None:
        raise ValueError(f"{what} needs the model's weights; this cache has none "
                         "(use ActivationCache.load(path, model=model) or model.run_with_cache)")
    return cache.model


def _layers_upto(cache, layer: Optional[int], what: str) -> int:
    """Number of whole layers before ``layer`` (None, -1 and n_layers mean all of them)."""
    L = cache.n_layers
    if L is None:
        raise ValueError(f"{what}: the cache does not know n_layers (no model and no fingerprint)")
    if layer is None or layer == -1:
        return L
    if not isinstance(layer, int) or not 0 <= layer <= L:
        raise ValueError(f"{what}: layer must be None, -1 or in [0, {L}], got {layer!r}")
    return layer


def accumulated_resid(cache, layer: Optional[int] = None, incl_final: bool = True,
                      return_labels: bool = True, apply_ln: bool = False, pos_slice: PosSlice = None):
    """The residual stream before each layer: ``[n_resid batch pos d_model]`` (and labels).

    ``layer=None`` (or -1, or n_layers): ``resid_pre`` of every layer plus the final
    ``resid_post`` (if ``incl_final``); ``layer=k < n_layers``: ``resid_pre`` 0..k (TransformerLens'
    habit). Labels are ``"resid_pre 0"`` ... ``"resid_post {L-1}"``, as in the logit lens.
    ``apply_ln=True`` applies the final LayerNorm to each residual with ITS OWN statistics (the
    standard logit lens; reusing the final residual's scale for every layer is a known bug in other
    tools) and returns float32.

    Example::

        resid, labels = accumulated_resid(cache, pos_slice=-1)     # [n_resid batch d_model]
    """
    L = _layers_upto(cache, layer, "accumulated_resid")
    n_pre = min(L + 1, cache.n_layers) if layer not in (None, -1) else cache.n_layers
    parts = [slice_pos(cache["resid_pre", i], pos_slice) for i in range(n_pre)]
    labels = [f"resid_pre {i}" for i in range(n_pre)]
    if L == cache.n_layers and incl_final:
        parts.append(slice_pos(cache["resid_post", cache.n_layers - 1], pos_slice))
        labels.append(f"resid_post {cache.n_layers - 1}")
    stack = torch.stack(parts)
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, pos_slice=pos_slice, recompute_ln=True)
    return (stack, labels) if return_labels else stack


def decompose_resid(cache, layer: Optional[int] = None, mode: str = "all", incl_embeds: bool = True,
                    return_labels: bool = True, apply_ln: bool = False, pos_slice: PosSlice = None):
    """The residual before ``layer`` split into what wrote it: ``[component batch pos d_model]``.

    Components, in order: ``"embed"`` (``hook_embed``), then per layer ``"attn_out {l}"`` and
    ``"mlp_out {l}"`` (``mode`` "attn" or "mlp" keeps one kind). With everything included, a
    running sum in that order reproduces ``resid_pre``/``resid_post`` bit for bit (it is the
    model's own sequence of additions). ``apply_ln=True``: the final LayerNorm linearised with the
    cached scale (see :meth:`apply_ln_to_stack`).

    Example::

        parts, labels = decompose_resid(cache, pos_slice=-1)       # [1 + 2L, batch, d_model]
    """
    if mode not in ("all", "attn", "mlp"):
        raise ValueError(f"mode: expected 'all', 'attn' or 'mlp', got {mode!r}")
    L = _layers_upto(cache, layer, "decompose_resid")
    parts, labels = [], []
    if incl_embeds:
        parts.append(slice_pos(cache["embed"], pos_slice))
        labels.append("embed")
    for i in range(L):
        for kind in ("attn_out", "mlp_out"):
            if mode in ("all", kind[:-4]):
                parts.append(slice_pos(cache[kind, i], pos_slice))
                labels.append(f"{kind} {i}")
    stack = torch.stack(parts)
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, layer=layer, pos_slice=pos_slice)
    return (stack, labels) if return_labels else stack


def head_results(cache, layer: int) -> torch.Tensor:
    """Per-head outputs of ``layer`` ``[batch pos head d_model]``: ``hook_result`` if cached, else
    ``hook_z`` × W_O computed with the model's own einsum (bitwise equal to ``hook_result``).

    Example::

        head_results(cache, 2)[:, -1, 5]        # head 5 of layer 2 at the last position [batch d_model]
    """
    if ("result", layer) in cache:
        return cache["result", layer]
    if ("z", layer) not in cache:
        raise KeyError(f"neither {act_name('result', layer)} nor {act_name('z', layer)} is "
                       "in the cache; cache one of them (names_filter)")
    model = _need_model(cache, "head results from hook_z")
    z = cache["z", layer]
    W = model_weight(model, block_name(layer, "attn.o_proj.weight")).to(z.device)    # [d_model (head d_head)]
    return per_head_result(z, W)


def stack_head_results(cache, layer: Optional[int] = -1, pos_slice: PosSlice = None,
                       return_labels: bool = True, apply_ln: bool = False):
    """Every head's output before ``layer`` (-1/None: all layers): ``[layer*head batch pos d_model]``.

    Labels ``"L{layer}H{head}"``. Taken from ``hook_result`` when cached, otherwise computed from
    ``hook_z`` and the model's ``W_O``. The heads of a layer sum to its ``attn_out`` up to float
    rounding (the model's fused ``o_proj`` adds in another order).

    Example::

        heads, labels = stack_head_results(cache, pos_slice=-1)    # [L*H, batch, d_model]
    """
    L = _layers_upto(cache, layer, "stack_head_results")
    parts, labels = [], []
    for i in range(L):
        r = slice_pos(head_results(cache, i), pos_slice)            # [batch (pos) head d_model]
        parts.append(rearrange(r, "b ... h m -> h b ... m"))
        labels += [f"L{i}H{h}" for h in range(r.shape[-2])]
    if not parts:
        raise ValueError("stack_head_results: layer=0 selects no heads")
    stack = torch.cat(parts)
    if apply_ln:
        stack = apply_ln_to_stack(cache, stack, pos_slice=pos_slice)
    return (stack, labels) if return_labels else stack


def apply_ln_to_stack(cache, residual_stack: torch.Tensor, layer: Optional[int] = None,
                      pos_slice: PosSlice = None, recompute_ln: bool = False) -> torch.Tensor:
    """A LayerNorm applied to each component of ``residual_stack`` ``[component batch (pos) d_model]``.

    ``layer=None`` (or -1 / n_layers): the FINAL LayerNorm (``ln_final``); ``layer=l``: block l's
    ``ln1``. With ``recompute_ln=False`` (default) the norm is linearised: each component is
    mean-centred (centring is linear) and divided by the scale cached from the real forward
    (``ln_final.hook_scale`` / ``blocks.{l}.ln1.hook_scale``, frozen), then multiplied by the norm's
    weight — so the components sum to the norm's real output. ``recompute_ln=True`` normalises
    each component with its own statistics (the logit lens). ``pos_slice`` must be the one used to
    build the stack (it selects the matching cached scales). Returns float32.

    Example::

        parts, _ = decompose_resid(cache, pos_slice=-1)
        normed = apply_ln_to_stack(cache, parts, pos_slice=-1)   # sums to ln_final's output
    """
    model = _need_model(cache, "apply_ln_to_stack")
    final = layer is None or layer == -1 or layer == cache.n_layers
    prefix = "ln_final" if final else block_name(_layers_upto(cache, layer, "apply_ln_to_stack"), "ln1")
    norm = model.get_submodule(prefix)
    weight = model_weight(model, f"{prefix}.weight").to(residual_stack.device, torch.float32)
    x = residual_stack.to(torch.float32)
    if recompute_ln:
        return layer_norm_fp32(x, weight, norm.eps)
    scale_name = act_name("scale", None if final else layer, None if final else "ln1")
    if scale_name not in cache:
        raise KeyError(f"{scale_name!r} is not in the cache: the frozen LayerNorm scale is needed; "
                       "include it in run_with_cache's names_filter")
    scale = slice_pos(cache[scale_name], pos_slice).to(x.device, torch.float32)  # [batch (pos) 1]
    if scale.shape[:-1] != x.shape[1:-1]:
        raise ValueError(f"apply_ln_to_stack: residual_stack {tuple(x.shape)} does not match the cached "
                         f"{scale_name} {tuple(scale.shape)} [batch (pos) 1]; pass the same pos_slice")
    centred = x - x.mean(-1, keepdim=True)
    return centred / scale * weight


def logit_attrs(cache, residual_stack: torch.Tensor, tokens, incorrect_tokens=None,
                pos_slice: PosSlice = None) -> torch.Tensor:
    """Direct logit attribution of each component: ``[component batch (pos)]`` float32.

    Each component goes through the final LayerNorm with its scale frozen (see
    :meth:`apply_ln_to_stack`), is projected on the unembedding of ``tokens`` (minus that of
    ``incorrect_tokens``) and multiplied by ``logit_scale``; the components sum to the logit (or
    logit difference) of the real forward. ``tokens``: an int, or a LongTensor broadcastable to
    the stack's ``[batch (pos)]`` axes.

    Example::

        parts, labels = decompose_resid(cache, pos_slice=-1)
        attrs = logit_attrs(cache, parts, tokens=answer, incorrect_tokens=wrong, pos_slice=-1)
    """
    model = _need_model(cache, "logit_attrs")
    normed = apply_ln_to_stack(cache, residual_stack, pos_slice=pos_slice)     # [component batch (pos) d_model]
    W_U = model_weight(model, "unembed.weight")                               # [vocab d_model]
    direction = _token_rows(W_U, tokens, "tokens", normed.device)
    if incorrect_tokens is not None:
        direction = direction - _token_rows(W_U, incorrect_tokens, "incorrect_tokens", normed.device)
    return (normed * direction).sum(-1) * model.cfg.logit_scale


def _token_rows(W_U: torch.Tensor, tokens, what: str, device) -> torch.Tensor:
    """Unembedding rows of ``tokens`` as float32 ``[... d_model]``."""
    ids = torch.as_tensor(tokens)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{what}: expected integer token ids, got dtype {ids.dtype}")
    ids = ids.long()
    if ((ids < 0) | (ids >= W_U.shape[0])).any():
        raise ValueError(f"{what}: token ids must be in [0, {W_U.shape[0]}), got {ids.tolist()}")
    return W_U[ids.to(W_U.device)].to(device, torch.float32)
