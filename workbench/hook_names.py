"""The hook vocabulary: which hook names exist, where they sit, their axes, dtype and head axis.

This is the one place hook names are built. Every other part (the hook table, the activation
cache's shorthand, the hooks/ recipes' head axes and patch tables, the analyses) asks it.

Names follow TransformerLens: ``hook_embed``, ``blocks.{layer}.hook_resid_pre``,
``blocks.{layer}.ln1.hook_scale``, ``blocks.{layer}.attn.hook_pattern``, ``blocks.{layer}.mlp.hook_post``,
``ln_final.hook_normalized``, ... Command-R's block is parallel (one LayerNorm feeds attention and
MLP, both added to the residual at once), so there is no ``hook_resid_mid`` and no ``ln2``:
``resid_post[l] = resid_pre[l] + attn_out[l] + mlp_out[l]``. There is no positional embedding
either (rotary acts on q and k inside attention: ``hook_rot_q``/``hook_rot_k``).

Example::

    act_name("pattern", 3)               # 'blocks.3.attn.hook_pattern'
    act_name("resid_pre", 0)             # 'blocks.0.hook_resid_pre'
    act_name("scale")                    # 'ln_final.hook_scale'
    act_name("scale", 2, "ln1")          # 'blocks.2.ln1.hook_scale'
    get_act_name("k6")                   # 'blocks.6.attn.hook_k' (TransformerLens spelling)
    head_axis("blocks.0.attn.hook_z")    # 2
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from typing import Optional


class HookNameError(ValueError, KeyError):
    """A hook kind, layer or module that Command-R does not have (a ValueError and a KeyError)."""

    __str__ = ValueError.__str__


@dataclass(frozen=True)
class HookKind:
    """One kind of hook: ``kind`` (``"pattern"``), the ``module`` holding it inside a block (or at
    the root for model-level hooks; ``""`` = directly on the block / root), its ``axes`` (the axis
    legend of model.py), ``dtype`` (``"model"`` or ``"float32"``) and the axis holding heads."""

    kind: str
    module: str
    block: bool
    axes: str
    dtype: str = "model"
    head_axis: Optional[int] = None

    @property
    def suffix(self) -> str:
        """The name below ``blocks.{layer}.`` (block hooks) or the root: ``"attn.hook_pattern"``."""
        return f"{self.module}.hook_{self.kind}" if self.module else f"hook_{self.kind}"

    @property
    def pos_axis(self) -> int:
        """Axis of this forward's (query) positions."""
        return self.axes.split().index("q_pos") if "q_pos" in self.axes else 1


_HEAD = "batch pos head d_head"
_KV = "batch pos kv_head d_head"
_QK = "batch head q_pos k_pos"

# In forward order (the model declares its hook points in this order too).
BLOCK_KINDS = (
    HookKind("resid_pre", "", True, "batch pos d_model"),
    HookKind("scale", "ln1", True, "batch pos 1", "float32"),
    HookKind("normalized", "ln1", True, "batch pos d_model"),
    HookKind("q", "attn", True, _HEAD, head_axis=2),
    HookKind("k", "attn", True, _KV, head_axis=2),
    HookKind("v", "attn", True, _KV, head_axis=2),
    HookKind("q_normed", "attn", True, _HEAD, head_axis=2),
    HookKind("k_normed", "attn", True, _KV, head_axis=2),
    HookKind("rot_q", "attn", True, _HEAD, head_axis=2),
    HookKind("rot_k", "attn", True, _KV, head_axis=2),
    HookKind("attn_scores", "attn", True, _QK, head_axis=1),
    HookKind("pattern", "attn", True, _QK, head_axis=1),
    HookKind("z", "attn", True, _HEAD, head_axis=2),
    HookKind("result", "attn", True, "batch pos head d_model", head_axis=2),
    HookKind("attn_out", "", True, "batch pos d_model"),
    HookKind("pre", "mlp", True, "batch pos d_mlp"),
    HookKind("pre_linear", "mlp", True, "batch pos d_mlp"),
    HookKind("post", "mlp", True, "batch pos d_mlp"),
    HookKind("mlp_out", "", True, "batch pos d_model"),
    HookKind("resid_post", "", True, "batch pos d_model"),
)
MODEL_KINDS = (
    HookKind("embed", "", False, "batch pos d_model"),
    HookKind("scale", "ln_final", False, "batch pos 1", "float32"),
    HookKind("normalized", "ln_final", False, "batch pos d_model"),
    HookKind("logits_unscaled", "", False, "batch pos vocab"),
    HookKind("logits", "", False, "batch pos vocab"),
)
_BY_BLOCK_KIND = {k.kind: k for k in BLOCK_KINDS}
_BY_MODEL_KIND = {k.kind: k for k in MODEL_KINDS}
_BY_SUFFIX = {**{k.suffix: k for k in MODEL_KINDS}, **{"blocks." + k.suffix: k for k in BLOCK_KINDS}}

# TransformerLens' get_act_name spellings -> ours
KIND_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q", "value": "v",
                "mlp_pre": "pre", "mlp_post": "post", "mlp_pre_linear": "pre_linear", "ln": "scale",
                "ln_scale": "scale", "final_scale": "scale", "unembed": "logits",
                "in": "resid_pre", "out": "resid_post"}   # TL bridge blocks' hook_in / hook_out
MODULE_ALIASES = {"a": "attn", "attn": "attn", "attention": "attn", "m": "mlp", "mlp": "mlp",
                  "b": "", "block": "", "blocks": "", "": "", "ln": "ln1", "ln1": "ln1", "ln_1": "ln1",
                  "ln_final": "ln_final", "lnf": "ln_final", "final": "ln_final"}
_ABSENT = {
    "resid_mid": "Command-R's block is parallel: there is no resid_mid (resid_post = resid_pre + attn_out + "
                 "mlp_out); use resid_pre, attn_out, mlp_out or resid_post",
    "ln2": "Command-R's block has one LayerNorm (ln1) feeding attention and MLP; there is no ln2",
    "ln_2": "Command-R's block has one LayerNorm (ln1) feeding attention and MLP; there is no ln2",
    "mid": "Command-R's MLP is SwiGLU without a mid activation; use pre, pre_linear or post",
    "mlp_mid": "Command-R's MLP is SwiGLU without a mid activation; use pre, pre_linear or post",
    "pos_embed": "Command-R has no positional embedding (rotary acts on q/k: rot_q, rot_k)",
}
_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")
_PACKED_RE = re.compile(r"^([a-z_]*?[a-z])(\d+)(?:_?([a-z][a-z_0-9]*))?$")   # "k6", "scale4ln1"


def _layer_index(layer) -> int:
    if callable(getattr(layer, "is_floating_point", None)) and layer.ndim == 0 and not layer.is_floating_point():
        layer = layer.item()                       # a 0-dim integer tensor, e.g. from topk(...).indices // n_heads
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise HookNameError(f"layer: expected an int (or None for model-level hooks), got {layer!r}")
    if layer < 0:
        raise HookNameError(f"layer: expected a block index >= 0, got {layer} (negative layers need n_layers: "
                            "resolve them first, e.g. layer % model.cfg.n_layers)")
    return int(layer)


def act_name(kind: str, layer: Optional[int] = None, layer_type: Optional[str] = None) -> str:
    """The full hook name of ``kind`` (at block ``layer``; ``layer_type`` names the submodule).

    Accepts TransformerLens' ``get_act_name`` spellings: aliases (``"attn"`` -> pattern, ``"a"``/``"m"``
    for the attention/MLP submodule), packed names (``"k6"``, ``"scale4ln1"``) and full names
    (returned unchanged). ``scale``/``normalized`` without a layer are ``ln_final``'s, with one ``ln1``'s.

    Example::

        act_name("pattern", 3)        # 'blocks.3.attn.hook_pattern'
        act_name("resid_post", 11)    # 'blocks.11.hook_resid_post'
        act_name("logits")            # 'hook_logits'
    """
    if not isinstance(kind, str) or not kind:
        raise HookNameError(f"hook kind: expected a name such as 'pattern' or 'resid_pre', got {kind!r}")
    if ("." in kind or kind.startswith("hook_")) and layer is None and layer_type is None:
        return kind
    if layer is None and kind not in _BY_BLOCK_KIND and kind not in _BY_MODEL_KIND and kind not in KIND_ALIASES:
        m = _PACKED_RE.match(kind)
        if m:
            kind, layer, packed_type = m.group(1), int(m.group(2)), m.group(3)
            layer_type = layer_type if layer_type is not None else packed_type
    kind = KIND_ALIASES.get(kind, kind)
    if kind in _ABSENT:
        raise HookNameError(f"hook kind {kind!r}: {_ABSENT[kind]}")
    if layer_type in _ABSENT:
        raise HookNameError(f"layer_type {layer_type!r}: {_ABSENT[layer_type]}")
    module = None
    if layer_type is not None:
        if layer_type not in MODULE_ALIASES:
            raise HookNameError(f"layer_type: unknown submodule {layer_type!r}; expected one of "
                                f"{sorted(k for k in MODULE_ALIASES if k)}")
        module = MODULE_ALIASES[layer_type]
    if layer is None:
        spec = _BY_MODEL_KIND.get(kind)
        if spec is None:
            where = f"; it is a block hook, give a layer: act_name({kind!r}, 0)" if kind in _BY_BLOCK_KIND else ""
            raise HookNameError(f"unknown model-level hook kind {kind!r}{where}; known: {sorted(_BY_MODEL_KIND)}")
        if module not in (None, "", spec.module):
            raise HookNameError(f"hook kind {kind!r} is not in submodule {layer_type!r}")
        return spec.suffix
    spec = _BY_BLOCK_KIND.get(kind)
    if spec is None:
        where = " (a model-level hook: no layer)" if kind in _BY_MODEL_KIND else ""
        raise HookNameError(f"unknown block hook kind {kind!r}{where}; known: {[k.kind for k in BLOCK_KINDS]}")
    if module is not None and module != spec.module:
        raise HookNameError(f"hook kind {kind!r} lives in {spec.module or 'the block'!r}, not in {layer_type!r}")
    return block_name(_layer_index(layer), spec.suffix)


get_act_name = act_name


def block_name(layer: int, suffix: str) -> str:
    """``block_name(3, "attn.o_proj.weight")`` -> ``"blocks.3.attn.o_proj.weight"`` (any name inside block 3)."""
    return f"blocks.{_layer_index(layer)}.{suffix}"


def block_key(kind: str) -> str:
    """The layer-free key of a block hook kind, as ``suffix_of`` gives it: ``"result"`` -> ``"blocks.attn.hook_result"``."""
    spec = _BY_BLOCK_KIND.get(KIND_ALIASES.get(kind, kind))
    if spec is None:
        raise HookNameError(f"unknown block hook kind {kind!r}; known: {[k.kind for k in BLOCK_KINDS]}")
    return "blocks." + spec.suffix


def layer_of(name: str) -> Optional[int]:
    """The block index of a hook or parameter name (None outside the blocks)."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def suffix_of(name: str) -> str:
    """``"blocks.3.attn.hook_z"`` -> ``"blocks.attn.hook_z"``-style key: the name without its layer index."""
    m = _LAYER_RE.match(name)
    return "blocks." + name[m.end():] if m else name


def kind_of(name: str) -> HookKind:
    """The vocabulary entry of a full hook name (HookNameError if it is not a Command-R hook)."""
    spec = _BY_SUFFIX.get(suffix_of(name))
    if spec is None:
        raise HookNameError(f"{name!r} is not a hook name of this model family")
    return spec


def head_axis(name: str) -> Optional[int]:
    """Axis holding heads for hook ``name`` (None if it has none, or if it is not a hook name)."""
    spec = _BY_SUFFIX.get(suffix_of(name))
    return spec.head_axis if spec is not None else None


def pos_axis(name: str) -> int:
    """Axis holding this forward's (query) positions for hook ``name``."""
    spec = _BY_SUFFIX.get(suffix_of(name))
    return spec.pos_axis if spec is not None else 1


def is_kind(name: str, kind: str) -> bool:
    """True when ``name`` is a hook of ``kind`` (``is_kind("blocks.2.attn.hook_pattern", "pattern")``)."""
    spec = _BY_SUFFIX.get(suffix_of(name))
    return spec is not None and spec.kind == KIND_ALIASES.get(kind, kind)
