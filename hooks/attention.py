"""Attention knockout: stop chosen query positions from attending to chosen key positions.

Implemented on ``hook_attn_scores`` (scaled and masked, before the softmax): the blocked scores are
set to the dtype's minimum — the same value the causal mask uses — so after the softmax they are
exactly 0 and every query's remaining attention renormalises over its other keys. Hooking the
scores makes that layer use the explicit attention path.

Positions are token indices in the whole sequence (cache index: ``past_len + i`` for the i-th
position of this forward), so a knockout keeps its meaning during cached generation. Knocking out
every visible key of a query is refused (its softmax would be meaningless).

Example::

    from hooks import knockout, knockout_hooks

    # the last token may not look at tokens 0..3, in every layer
    fwd = knockout_hooks(range(model.cfg.n_layers), queries=[ids.shape[1] - 1], keys=range(4))
    logits = model.run_with_hooks(ids, fwd_hooks=fwd)
"""

from __future__ import annotations

import torch

from workbench.hook_names import act_name

from .ablate import Index, to_index


def knockout(queries: Index = None, keys: Index = None, heads: Index = None):
    """``fn(scores, hook)`` for ``hook_attn_scores``: block ``queries`` × ``keys`` (× ``heads``).

    None means all (queries, keys or heads).

    Example::

        fwd = [("blocks.1.attn.hook_attn_scores", knockout(queries=[7], keys=[2, 3], heads=[0]))]
    """
    q_want, k_want, h_want = to_index(queries, "queries"), to_index(keys, "keys"), to_index(heads, "heads")

    def fn(scores: torch.Tensor, hook) -> torch.Tensor:      # [batch head q_pos k_pos]
        if not hook.name.endswith("hook_attn_scores"):
            raise ValueError(f"knockout hooks hook_attn_scores, not {hook.name!r}")
        b, h, nq, nk = scores.shape
        dev = scores.device
        q_idx = torch.arange(hook.ctx.past_len, hook.ctx.past_len + nq, device=dev)
        k_idx = torch.arange(hook.ctx.past_len + nq - nk, hook.ctx.past_len + nq, device=dev)  # a suffix
        qm = torch.isin(q_idx, q_want.to(dev)) if q_want is not None else torch.ones(nq, dtype=torch.bool, device=dev)
        km = torch.isin(k_idx, k_want.to(dev)) if k_want is not None else torch.ones(nk, dtype=torch.bool, device=dev)
        hm = torch.ones(h, dtype=torch.bool, device=dev)
        if h_want is not None:
            if (h_want >= h).any():
                raise ValueError(f"heads: {h_want.tolist()} out of range for {hook.name!r} with {h} heads")
            hm = torch.zeros(h, dtype=torch.bool, device=dev)
            hm[h_want.to(dev)] = True
        block = hm[:, None, None] & qm[None, :, None] & km[None, None, :]      # [head q_pos k_pos]
        floor = torch.finfo(scores.dtype).min
        visible = scores > floor / 2                       # masked scores sit at (about) finfo.min
        left = visible & ~block
        starved = visible.any(-1) & ~left.any(-1)
        if starved.any():
            bb, hh, qq = starved.nonzero()[0].tolist()
            raise ValueError(f"{hook.name}: knockout blocks every visible key of query position "
                             f"{int(q_idx[qq])} (batch {bb}, head {hh}); leave it at least one key")
        return scores.masked_fill(block, floor)

    return fn


def knockout_hooks(layers, queries: Index = None, keys: Index = None, heads: Index = None) -> list:
    """``[(name, fn)]``: the same knockout on ``hook_attn_scores`` of every layer in ``layers``.

    Example::

        model.run_with_hooks(ids, fwd_hooks=knockout_hooks([0, 1], queries=[5], keys=[4]))
    """
    layers = [layers] if isinstance(layers, int) else list(layers)
    fn = knockout(queries, keys, heads)
    return [(act_name("attn_scores", layer), fn) for layer in layers]
