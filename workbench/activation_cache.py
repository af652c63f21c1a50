"""ActivationCache: hook name -> tensor, with TransformerLens-style shorthand.

Example::

    logits, cache = model.run_with_cache(tokens)
    cache["blocks.3.attn.hook_pattern"]     # full name
    cache["pattern", 3]                     # shorthand: same tensor
    cache["resid_post", -1]                 # negative layers count from the end
    cache["scale", 2, "ln1"]                # blocks.2.ln1.hook_scale
    cache["logits"]                         # hook_logits
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Union

import torch

NamesFilter = Union[None, str, list, tuple, set, Callable[[str], bool]]

# shorthand -> (submodule inside blocks.{i} or None for block level)
_BLOCK_SUB = {
    "resid_pre": None, "resid_post": None, "attn_out": None, "mlp_out": None,
    "q": "attn", "k": "attn", "v": "attn", "q_normed": "attn", "k_normed": "attn",
    "rot_q": "attn", "rot_k": "attn", "attn_scores": "attn", "pattern": "attn", "z": "attn",
    "result": "attn", "pre": "mlp", "pre_linear": "mlp", "post": "mlp",
    "scale": "ln1", "normalized": "ln1",
}


def names_filter_fn(names_filter: NamesFilter) -> Callable[[str], bool]:
    if names_filter is None:
        return lambda name: True
    if isinstance(names_filter, str):
        return lambda name: name == names_filter
    if isinstance(names_filter, (list, tuple, set)):
        wanted = set(names_filter)
        return lambda name: name in wanted
    if callable(names_filter):
        return names_filter
    raise TypeError(f"names_filter must be None, a name, a list of names or a predicate, got {names_filter!r}")


def expand_name(key, n_layers: Optional[int] = None) -> str:
    """``("pattern", 3)`` -> ``"blocks.3.attn.hook_pattern"``; full names pass through."""
    if isinstance(key, str):
        if "." in key or key.startswith("hook_"):
            return key
        if key in ("embed", "logits", "logits_unscaled"):
            return f"hook_{key}"
        raise KeyError(f"{key!r}: give a full hook name or (name, layer), e.g. ('pattern', 0)")
    if not isinstance(key, tuple) or not key:
        raise KeyError(f"bad cache key {key!r}")
    name, *rest = key
    layer = rest[0] if rest else None
    sub = rest[1] if len(rest) > 1 else None
    if layer is None:
        if name in ("scale", "normalized"):
            return f"ln_final.hook_{name}"
        return expand_name(name)
    if n_layers is not None and layer < 0:
        layer += n_layers
    if sub is None:
        if name not in _BLOCK_SUB:
            raise KeyError(f"unknown activation {name!r}; known: {sorted(_BLOCK_SUB)}")
        sub = _BLOCK_SUB[name]
    prefix = f"blocks.{layer}." + (f"{sub}." if sub else "")
    return f"{prefix}hook_{name}"


class ActivationCache:
    """A read-only mapping of hook name -> activation tensor from one forward."""

    def __init__(self, cache: dict, model=None, metadata: Optional[dict] = None) -> None:
        self.cache_dict = dict(cache)
        self.model = model
        self.metadata = dict(metadata or {})
        cfg = getattr(model, "cfg", None)
        self.n_layers = cfg.n_layers if cfg is not None else self.metadata.get("n_layers")

    def _name(self, key) -> str:
        return expand_name(key, self.n_layers)

    def __getitem__(self, key) -> torch.Tensor:
        name = self._name(key)
        if name not in self.cache_dict:
            import difflib

            close = difflib.get_close_matches(name, list(self.cache_dict), n=5, cutoff=0.5)
            raise KeyError(f"{name!r} is not in the cache" + (f"; closest: {close}" if close else ""))
        return self.cache_dict[name]

    def __contains__(self, key) -> bool:
        try:
            return self._name(key) in self.cache_dict
        except KeyError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def to(self, device) -> "ActivationCache":
        """A copy with every tensor on ``device``."""
        return ActivationCache({k: v.to(device) for k, v in self.cache_dict.items()}, self.model, self.metadata)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} tensors: {list(self.cache_dict)[:4]}{' ...' if len(self) > 4 else ''})"
