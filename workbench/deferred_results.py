"""Per-head attention results computed after the forward, for caches that only record them.

``blocks.{l}.attn.hook_result`` ([batch pos head d_model], each head's z through its slice of
o_proj) costs a per-head einsum in the forward when something listens to it. When only
``run_with_cache`` does, the model instead records ``hook_z`` and the o_proj weight seen during the
forward and stores a ``Deferred`` entry that runs the same einsum (bitwise the same tensor) when the
cache entry is first read. The hook machinery knows nothing of this: the model lists these rules in
``HookedCommandR.deferred_hooks`` (hook kind key -> rule with a ``plan`` method).

Example::

    logits, cache = model.run_with_cache(ids)       # every hook, hook_result deferred
    cache["result", 0]                              # computed here, from cache["z", 0]
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .activation_cache import Deferred
from .hook_names import act_name, block_key, block_name, layer_of
from .hook_points import records_only
from .weights import per_head_result


class DeferredHeadResult:
    """Rule for ``attn.hook_result``: listen to ``attn.hook_z`` instead and defer the einsum."""

    def plan(self, model: nn.Module, name: str, store: dict, device) -> Optional[tuple]:
        """``(hook name to listen to, fn)`` storing a ``Deferred`` for ``name`` in ``store``, or None
        when the result cannot be recomputed later (a quantized o_proj runs only as a module)."""
        layer = layer_of(name)
        attn = model.get_submodule(block_name(layer, "attn"))
        if not attn.can_defer_result():
            return None
        return act_name("z", layer), _saver(name, attn.o_proj, store, device)


def _saver(name: str, o_proj: nn.Linear, store: dict, device):
    @records_only
    def save(z: torch.Tensor, hook) -> None:
        z = z.detach()
        # Taken inside the forward: under accelerate offload this is the weight loaded for the block
        # (outside the forward the parameter is on the meta device).
        param = o_proj.weight
        weight, version = param.detach(), param._version

        def compute() -> torch.Tensor:
            if param is o_proj.weight and param._version != version:
                raise RuntimeError(f"{name}: o_proj.weight was modified after the forward that filled this "
                                   f"cache; re-run run_with_cache to get per-head results")
            with torch.no_grad():
                result = per_head_result(z, weight)              # [batch pos head d_model]
            return result.to(device) if device is not None else result

        store[name] = Deferred(compute)

    return save


DEFERRED_HOOKS = {block_key("result"): DeferredHeadResult()}
