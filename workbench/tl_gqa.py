"""Grouped-query attention seen per query head: TransformerLens' ``ungroup_grouped_query_attention``.

Command-R models share each key/value head among ``group`` query heads (query head j reads kv head
``j // group``). By default ``hook_k``/``hook_v`` (and ``hook_k_normed``, ``hook_rot_k``) carry the
``kv_head`` heads the model computes, as in TransformerLens. With the flag on
(``model.set_ungroup_grouped_query_attention(True)`` or ``cfg.ungroup_grouped_query_attention = True``)
they carry one copy per query head ``[batch pos head d_head]`` (``repeat_interleave`` of the kv heads,
TransformerLens' ``GroupedQueryAttention``), and that per-head copy is what enters attention: the
QK-norm weights ``[kv_head d_head]`` are repeated the same way and rotary follows, so a hook that
edits query head j's keys or values changes only head j. Without an edit the logits are bit for bit
the grouped model's. ``W_K``/``W_V`` are per query head either way (TransformerLens' convention).

Example::

    model.set_ungroup_grouped_query_attention(True)
    _, cache = model.run_with_cache("The capital of France is")
    cache["v", 0].shape                  # [batch pos head d_head]: head 3 is a copy of kv head 1

A hook that indexes query heads on a grouped ``hook_v`` fails with an ``IndexError`` naming the
switch (TransformerLens raises a bare ``IndexError`` there).
"""

from __future__ import annotations

import warnings

import torch
from einops import repeat

KV_HOOKS = ("hook_k", "hook_v", "hook_k_normed", "hook_rot_k")


def ungroup_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[batch pos kv_head d_head] -> [batch pos head d_head]: kv head k serves heads k*group .. k*group+group-1."""
    return repeat(x, "b s k d -> b s (k g) d", g=group)


def ungroup_weight(weight: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-head weights [kv_head d_head] repeated to ``n_rows`` heads [head d_head] (unchanged if equal)."""
    if weight.shape[0] == n_rows:
        return weight
    return repeat(weight, "k d -> (k g) d", g=n_rows // weight.shape[0])


def kv_hook(hook, x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``hook(x)`` for a key/value hook; an ``IndexError`` raised by a hook function on a grouped
    tensor (fewer heads than ``n_heads``) is re-raised naming the switch that gives per-head keys/values."""
    if not hook.has_hooks or x.shape[2] == n_heads:
        return hook(x)
    try:
        return hook(x)
    except IndexError as exc:
        raise IndexError(
            f"{exc} (in a hook on {hook.name}, which carries {x.shape[2]} key/value heads "
            f"[batch pos kv_head d_head] shared by {n_heads} query heads under grouped-query attention; "
            f"to index query heads 0..{n_heads - 1} call model.set_ungroup_grouped_query_attention(True), "
            f"as in TransformerLens)") from exc


def warn_if_regrouped(name: str, value, model) -> None:
    """Warn when a cached key/value tensor has another head count than the model's hook has now
    (the switch was flipped after the cache was made): head index j means a different head in each."""
    if model is None or name.rsplit(".", 1)[-1] not in KV_HOOKS or not isinstance(value, torch.Tensor):
        return
    cfg = getattr(model, "cfg", None)
    if cfg is None or cfg.n_heads == cfg.n_kv_heads or value.dim() < 2 or value.shape[-2] == cfg.n_key_value_heads:
        return
    warnings.warn(f"cache[{name!r}] holds {value.shape[-2]} key/value heads but the model's {name} now carries "
                  f"{cfg.n_key_value_heads} (ungroup_grouped_query_attention={cfg.ungroup_grouped_query_attention} "
                  f"since the cache was made): head index j names a different head in each; rerun run_with_cache",
                  stacklevel=4)             # the user's cache[...] line (via the TL-alias wrapper)


def check_flag(value) -> bool:
    """The flag's value, refused unless a real bool (a string "false" must never read as True)."""
    if not isinstance(value, bool):
        raise ValueError(f"ungroup_grouped_query_attention: expected True or False, got {value!r}")
    return value
