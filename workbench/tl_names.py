"""TransformerLens' activation-name vocabulary on HookedCommandR: ``get_act_name`` with TL's aliases.

A local, self-contained version (the project's hook vocabulary module may later absorb it). The
rules are TransformerLens' ``utils.get_act_name``, adapted to Command-R's parallel block: the one
block LayerNorm is ``ln1`` (there is no ``ln2`` and no ``resid_mid``), so ``("scale", 3)`` means
``blocks.3.ln1.hook_scale`` and ``"scale"`` alone the final norm's.

Example::

    get_act_name("resid_pre", 3)        # 'blocks.3.hook_resid_pre'
    get_act_name("attn", 0)             # 'blocks.0.attn.hook_pattern'  (TL's alias)
    get_act_name("q2a")                 # 'blocks.2.attn.hook_q'        (TL's compact form)
    get_act_name("scale")               # 'ln_final.hook_scale'
"""

from __future__ import annotations

import re
from typing import Optional

_NAME_ALIAS = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
               "mlp_pre": "pre", "mlp_post": "post", "mlp_pre_linear": "pre_linear"}
_LAYER_TYPE_ALIAS = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn",
                     "ln": "ln1", "ln1": "ln1"}
_ATTN = ("q", "k", "v", "q_normed", "k_normed", "rot_q", "rot_k", "attn_scores", "pattern", "z", "result")
_MLP = ("pre", "pre_linear", "post")
_NORM = ("scale", "normalized")
_NOT_IN_COMMAND_R = {
    "resid_mid": "Command-R's block is parallel (attention and MLP both read ln1(resid_pre)); there is no resid_mid",
    "mid": "Command-R's MLP is SwiGLU without a solu LayerNorm; there is no mlp.hook_mid",
    "attn_in": "there is no attn_in hook (attention reads blocks.{l}.ln1.hook_normalized)",
    "mlp_in": "there is no mlp_in hook (the MLP reads blocks.{l}.ln1.hook_normalized)",
    "pos_embed": "Command-R has rotary positions, no learned positional embedding (no hook_pos_embed)",
}


def get_act_name(name: str, layer: Optional[int] = None, layer_type: Optional[str] = None) -> str:
    """TransformerLens-style name -> the full hook name on HookedCommandR (see the module docstring).

    Full names pass through. Raises ``KeyError`` naming the reason for names Command-R has no hook
    for (``resid_mid``, ``ln2``, ``pos_embed``, ...).

    Example::

        get_act_name("pattern", 2)      # 'blocks.2.attn.hook_pattern'
    """
    if not isinstance(name, str):
        raise TypeError(f"get_act_name: name must be a str, got {type(name).__name__}")
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    match = re.fullmatch(r"([a-z_]+?)(\d+)([a-z]*)", name)
    if match is not None and layer is None:
        name, layer, layer_type = match.group(1), int(match.group(2)), match.group(3) or None
    name = _NAME_ALIAS.get(name, name)
    if name in _NOT_IN_COMMAND_R:
        raise KeyError(f"{name!r}: {_NOT_IN_COMMAND_R[name]}")
    if layer_type == "ln2":
        raise KeyError("'ln2': Command-R's block is parallel with ONE LayerNorm, blocks.{l}.ln1")
    if layer is None:
        if name in _NORM:
            return f"ln_final.hook_{name}"
        return f"hook_{name}"
    if layer_type is not None and layer_type not in _LAYER_TYPE_ALIAS and layer_type not in ("attn", "mlp"):
        raise KeyError(f"layer_type {layer_type!r}: expected one of attn, mlp, ln1 or TL's aliases "
                       f"{sorted(_LAYER_TYPE_ALIAS)}")
    if name in _ATTN:
        sub = "attn"
    elif name in _MLP:
        sub = "mlp"
    elif name in _NORM:
        sub = "ln1"
    else:
        sub = _LAYER_TYPE_ALIAS.get(layer_type, layer_type) if layer_type is not None else ""
    return f"blocks.{int(layer)}." + (f"{sub}." if sub else "") + f"hook_{name}"
