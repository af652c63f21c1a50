"""Logit lens: read every residual stream through the model's own head.

Each residual (``resid_pre`` of every layer and the final ``resid_post``) goes through the final
LayerNorm — with that residual's OWN mean and variance and ``ln_final``'s weight — then the
unembedding and ``logit_scale``. The last ``resid_post`` therefore gives exactly ``hook_logits``.
(Tools that skip ``logit_scale`` or the final norm, or reuse the last layer's norm scale for every
layer, give wrong probabilities on Command-R.)

``lens_top`` is the one batched implementation: every residual stream of a stack goes through the
head in one call (chunked only to bound memory), returning top-k, a target's probability and its
rank. ``logit_lens`` (a prompt or a cache) and the live views (one generation step at a time) both
call it.

Example::

    lens = logit_lens(model, input_ids, top_k=5, target=answer_id)
    lens.labels            # ["resid_pre 0", ..., "resid_pre L-1", "resid_post L-1"]
    lens.top_ids[:, 0, -1] # [n_resid k] top tokens per layer at the last position
    lens.target_rank[:, 0, -1]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ..activation_cache import ActivationCache, model_weight
from ..hook_names import act_name
from ..model import layer_norm_fp32


def lens_logits(model, resid: torch.Tensor) -> torch.Tensor:
    """``resid [... d_model]`` -> logits ``[... vocab]``: ln_final (own statistics) + unembed + logit_scale.

    The same operations as the model's head, so the last ``resid_post`` gives ``hook_logits`` bit
    for bit. Works under accelerate offload (weights are read from the offload map).

    Example::

        logits, cache = model.run_with_cache(ids)
        torch.equal(lens_logits(model, cache["resid_post", -1]), logits)   # True
    """
    if resid.shape[-1] != model.cfg.d_model:
        raise ValueError(f"resid: last axis must be d_model={model.cfg.d_model}, got shape {tuple(resid.shape)}")
    weight = model_weight(model, "ln_final.weight").to(resid.device)
    W_U = model_weight(model, "unembed.weight").to(resid.device)      # [vocab d_model]
    normed = layer_norm_fp32(resid, weight, model.ln_final.eps).to(W_U.dtype)
    return F.linear(normed, W_U) * model.cfg.logit_scale


def lens_resid_names(n_layers: int) -> list[str]:
    """The hook names a logit lens reads: ``resid_pre`` of every layer, then the last ``resid_post``.

    (A local helper until the hook vocabulary module provides ``act_name``.)

    Example::

        model.run_with_cache(ids, names_filter=lens_resid_names(model.cfg.n_layers))
    """
    return [act_name("resid_pre", i) for i in range(n_layers)] + [act_name("resid_post", n_layers - 1)]


# Probabilities computed at once, at most (floats): bounds the [chunk ... vocab] intermediate.
_CHUNK_FLOATS = 1 << 26


@torch.no_grad()
def lens_top(model, stack: torch.Tensor, top_k: int = 5, target=None):
    """The batched logit lens: ``stack [n_resid ... d_model]`` -> ``(top_ids, top_probs, target_prob,
    target_rank)``, top-k ``[n_resid ... k]``, target ``[n_resid ...]`` (None without ``target``).

    ``target``: a token id or a LongTensor broadcastable to ``stack.shape[1:-1]``. Rank 0 = the top
    token; ties count against the target. All residuals go through ``lens_logits`` in one call; the
    stack is split along ``n_resid`` only when ``[n_resid ... vocab]`` would exceed ~256 MB.

    Example::

        stack = torch.stack([cache[n][0] for n in lens_resid_names(L)])     # [n_resid pos d_model]
        top_ids, top_probs, p, rank = lens_top(model, stack, top_k=5, target=paris)
    """
    if not isinstance(top_k, int) or not 1 <= top_k <= model.cfg.vocab_size:
        raise ValueError(f"top_k: expected an int in [1, {model.cfg.vocab_size}], got {top_k!r}")
    if stack.dim() < 2:
        raise ValueError(f"stack: expected [n_resid ... d_model], got shape {tuple(stack.shape)}")
    per_resid = max(1, stack[0].numel() // max(1, stack.shape[-1])) * model.cfg.vocab_size
    step = max(1, _CHUNK_FLOATS // per_resid)
    tgt = None
    if target is not None:
        tgt = torch.as_tensor(target, device=stack.device)
        if tgt.is_floating_point() or tgt.dtype == torch.bool:
            raise ValueError(f"target: expected integer token ids, got dtype {tgt.dtype}")
        if ((tgt < 0) | (tgt >= model.cfg.vocab_size)).any():
            raise ValueError(f"target: token ids must be in [0, {model.cfg.vocab_size})")
        tgt = tgt.long().expand(stack.shape[1:-1])
    ids, probs, t_prob, t_rank = [], [], [], []
    for chunk in stack.split(step):                      # [chunk ... d_model], usually the whole stack
        logits = lens_logits(model, chunk).float()       # [chunk ... vocab]
        p_all = logits.softmax(-1)
        p, i = p_all.topk(top_k, dim=-1)
        ids.append(i)
        probs.append(p)
        if tgt is not None:
            t = tgt.to(logits.device).expand(logits.shape[:-1])[..., None]
            t_prob.append(p_all.gather(-1, t)[..., 0])
            t_rank.append((logits > logits.gather(-1, t)).sum(-1))
    if tgt is None:
        return torch.cat(ids), torch.cat(probs), None, None
    return torch.cat(ids), torch.cat(probs), torch.cat(t_prob), torch.cat(t_rank)


@dataclass
class LogitLens:
    """What the model would predict from each residual stream.

    ``top_ids``/``top_probs`` ``[n_resid batch pos k]``; ``target_prob``/``target_rank``
    ``[n_resid batch pos]`` (rank 0 = the top token; ties count against the target) or None.
    ``positions`` are the input positions the ``pos`` axis refers to.
    """

    labels: list
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    target_prob: Optional[torch.Tensor] = None
    target_rank: Optional[torch.Tensor] = None
    positions: Optional[torch.Tensor] = None
    target_ids: Optional[torch.Tensor] = None
    tokens: Optional[torch.Tensor] = field(default=None, repr=False)


def _positions(positions, n_pos: int) -> torch.Tensor:
    if positions is None:
        return torch.arange(n_pos)
    if isinstance(positions, slice):
        return torch.arange(n_pos)[positions]
    idx = torch.as_tensor(positions, dtype=torch.long).reshape(-1)
    if ((idx < -n_pos) | (idx >= n_pos)).any():
        raise ValueError(f"positions: {idx.tolist()} out of range for {n_pos} positions")
    return idx % n_pos


def _target(target, batch: int, pos_idx: torch.Tensor, n_pos: int, vocab: int) -> torch.Tensor:
    """target -> LongTensor [batch pos_sel]."""
    t = torch.as_tensor(target)
    if t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"target: expected integer token ids, got dtype {t.dtype}")
    t = t.long()
    if t.dim() == 2 and t.shape[1] == n_pos and n_pos != len(pos_idx):
        t = t[:, pos_idx.to(t.device)]              # given for every input position
    elif t.dim() == 1:
        t = t[:, None]                             # one target per sequence
    try:
        t = t.expand(batch, len(pos_idx))
    except RuntimeError:
        raise ValueError(f"target: shape {tuple(torch.as_tensor(target).shape)} does not fit "
                         f"[batch={batch}, pos={len(pos_idx)}] (an int, [batch] or [batch, pos])") from None
    if ((t < 0) | (t >= vocab)).any():
        raise ValueError(f"target: token ids must be in [0, {vocab})")
    return t


@torch.no_grad()
def logit_lens(model, cache_or_input_ids, top_k: int = 5, target=None, positions=None,
               attention_mask=None) -> LogitLens:
    """Top-k predictions (and a target token's probability and rank) from every residual stream.

    ``cache_or_input_ids``: an ``ActivationCache`` holding ``resid_pre`` of every layer and the last
    ``resid_post``, or input ids ``[batch pos]`` (run once, caching only those). ``positions``: None
    (all), an int, a list or a slice of input positions. ``target``: a token id, or ids ``[batch]`` /
    ``[batch pos]`` (pos = the selected positions, or every input position).

    Example::

        lens = logit_lens(model, ids, target=answer_id, positions=[-1])
        lens.target_rank[:, 0, 0]      # the answer's rank after each layer
    """
    if not isinstance(top_k, int) or not 1 <= top_k <= model.cfg.vocab_size:
        raise ValueError(f"top_k: expected an int in [1, {model.cfg.vocab_size}], got {top_k!r}")
    if isinstance(cache_or_input_ids, Mapping) and not isinstance(cache_or_input_ids, ActivationCache):
        cache_or_input_ids = ActivationCache(dict(cache_or_input_ids), model)   # a plain name -> tensor dict
    if isinstance(cache_or_input_ids, ActivationCache):
        cache = cache_or_input_ids
        tokens = cache.metadata.get("tokens")
    else:
        tokens = torch.as_tensor(cache_or_input_ids)
        if model.device.type != "meta":           # meta = accelerate offload: its hooks move inputs
            tokens = tokens.to(model.device)
        names = lens_resid_names(model.cfg.n_layers)
        _, cache = model.run_with_cache(tokens, names_filter=names, attention_mask=attention_mask)
    n_pos = cache["resid_pre", 0].shape[1]
    pos_idx = _positions(positions, n_pos)
    stack, labels = cache.accumulated_resid(pos_slice=pos_idx)       # [n_resid batch pos d_model]
    batch = stack.shape[1]
    tgt = _target(target, batch, pos_idx, n_pos, model.cfg.vocab_size) if target is not None else None
    top_ids, top_probs, t_prob, t_rank = lens_top(model, stack, top_k, tgt)
    return LogitLens(
        labels=labels,
        top_ids=top_ids,
        top_probs=top_probs,
        target_prob=t_prob,
        target_rank=t_rank,
        positions=pos_idx,
        target_ids=tgt,
        tokens=tokens,
    )
