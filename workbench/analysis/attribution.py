"""Direct logit attribution: how much each component writes straight into a logit.

The final residual is a sum of what wrote it: the embedding, every head of every layer (Command-R's
block is parallel, so each layer adds ``attn_out`` and ``mlp_out`` to the same ``resid_pre``) and
every MLP. The final LayerNorm is linear once its scale is frozen at the value the real forward used
(``ln_final.hook_scale``): mean-centring is linear, so it is applied to each component, which is then
divided by the frozen scale, multiplied by ``ln_final``'s weight, projected on the unembedding
direction of the answer (minus that of the wrong token) and multiplied by ``logit_scale``. There is no
unembedding bias and the LayerNorm has no bias, so the components add up to the logit (difference).

Example::

    dla = direct_logit_attribution(model, ids, answer=tok_paris, wrong=tok_rome)
    dla.heads[:, :, 0]        # [layer head] for the first prompt
    dla.values.sum(0), dla.logit          # equal up to float rounding
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..activation_cache import ActivationCache
from ..hook_names import act_name
from .logit_lens import lens_logits


@dataclass
class LogitAttribution:
    """Per-component contributions to a logit (difference), float32.

    ``labels`` ``["embed", "L0H0", ..., "L0H{H-1}", "mlp 0", "L1H0", ...]`` index ``values``
    ``[component batch]``; the same numbers as ``embed`` ``[batch]``, ``heads`` ``[layer head batch]``
    and ``mlp`` ``[layer batch]``. ``logit`` ``[batch]`` is the real forward's logit (difference).
    """

    labels: list
    values: torch.Tensor
    embed: torch.Tensor
    heads: torch.Tensor
    mlp: torch.Tensor
    logit: torch.Tensor
    position: int
    answer: torch.Tensor
    wrong: torch.Tensor | None = None

    @property
    def total(self) -> torch.Tensor:
        """Sum of the components ``[batch]`` (equals ``logit`` up to float rounding)."""
        return self.values.sum(0)


def _needed_names(n_layers: int) -> list:
    names = ["hook_embed", "ln_final.hook_scale", "hook_logits"]
    for i in range(n_layers):
        names += [act_name("z", i), act_name("mlp_out", i)]
    return names


@torch.no_grad()
def direct_logit_attribution(model, cache_or_input_ids, answer, wrong=None, position: int = -1,
                             attention_mask=None) -> LogitAttribution:
    """Split the logit of ``answer`` (minus ``wrong``) at ``position`` into embed / heads / MLPs.

    ``cache_or_input_ids``: an ``ActivationCache`` with ``hook_embed``, each layer's ``hook_result``
    or ``hook_z``, ``hook_mlp_out`` and ``ln_final.hook_scale``; or input ids (run once, caching
    just those, ``hook_z`` so the attention path is unchanged). ``answer``/``wrong``: an int or
    ``[batch]`` token ids.

    Example::

        dla = direct_logit_attribution(model, ids, answer=42)
        top = dla.values[:, 0].abs().topk(5).indices
        [dla.labels[i] for i in top]
    """
    if not isinstance(position, int):
        raise ValueError(f"position: expected an int (one position for every row), got {position!r}")
    cfg = model.cfg
    if isinstance(cache_or_input_ids, Mapping) and not isinstance(cache_or_input_ids, ActivationCache):
        cache_or_input_ids = ActivationCache(dict(cache_or_input_ids), model)   # a plain name -> tensor dict
    if isinstance(cache_or_input_ids, ActivationCache):
        cache = cache_or_input_ids
    else:
        ids = torch.as_tensor(cache_or_input_ids)
        if model.device.type != "meta":           # meta = accelerate offload: its hooks move inputs
            ids = ids.to(model.device)
        _, cache = model.run_with_cache(ids, names_filter=_needed_names(cfg.n_layers), attention_mask=attention_mask)
    L, H = cfg.n_layers, cfg.n_heads
    embed = cache["embed"][:, position]                                   # [batch d_model]
    parts = [embed[None]]
    for i in range(L):
        heads = cache.head_results(i)[:, position]                        # [batch head d_model]
        parts += [heads.transpose(0, 1), cache["mlp_out", i][:, position][None]]
    stack = torch.cat(parts)                                               # [1 + L*(H+1), batch, d_model]
    batch = stack.shape[1]
    answer_ids = _ids(answer, batch, "answer")
    wrong_ids = _ids(wrong, batch, "wrong") if wrong is not None else None
    values = cache.logit_attrs(stack, answer_ids, wrong_ids, pos_slice=position)   # [component batch]
    per_layer = values[1:].reshape(L, H + 1, batch)
    labels = ["embed"]
    for i in range(L):
        labels += [f"L{i}H{h}" for h in range(H)] + [f"mlp {i}"]
    if "logits" in cache:
        logits = cache["logits"][:, position].float()                      # [batch vocab]
    else:
        logits = lens_logits(model, cache["resid_post", L - 1][:, position]).float()
    rows = torch.arange(batch, device=logits.device)
    logit = logits[rows, answer_ids.to(logits.device)]
    if wrong_ids is not None:
        logit = logit - logits[rows, wrong_ids.to(logits.device)]
    return LogitAttribution(labels=labels, values=values, embed=values[0], heads=per_layer[:, :H],
                            mlp=per_layer[:, H], logit=logit, position=position, answer=answer_ids,
                            wrong=wrong_ids)


def _ids(tokens, batch: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(tokens)
    if t.is_floating_point() or t.dtype == torch.bool or t.dim() > 1:
        raise ValueError(f"{what}: expected a token id or LongTensor [batch], got {tokens!r}")
    if t.dim() == 1 and t.shape[0] not in (1, batch):
        raise ValueError(f"{what}: has {t.shape[0]} ids for a batch of {batch}")
    return t.long().reshape(-1).expand(batch).clone()
