"""ActivationCache: hook name -> tensor, with TransformerLens-style shorthand.

Example::

    logits, cache = model.run_with_cache(tokens)
    cache["blocks.3.attn.hook_pattern"]     # full name
    cache["pattern", 3]                     # shorthand: same tensor (names from workbench.hook_names)
    cache["resid_post", -1]                 # negative layers count from the end
    cache["scale", 2, "ln1"]                # blocks.2.ln1.hook_scale
    cache["scale"]                          # ln_final.hook_scale, as in TransformerLens
    cache["logits"]                         # hook_logits

    resid, labels = cache.accumulated_resid()          # [n_resid batch pos d_model], "resid_pre 0", ...
    parts, labels = cache.decompose_resid()            # embed, attn_out 0, mlp_out 0, ... (sums to resid)
    heads, labels = cache.stack_head_results()         # [layer*head batch pos d_model], "L0H0", ...
    cache.logit_attrs(parts, tokens=answer_ids)        # [component batch pos], frozen ln_final scale
    cache.save("run.safetensors", tokens=ids)
    ActivationCache.load("run.safetensors", model=model)   # refuses another config or other weights

The cache is a container; the residual-stream methods are thin delegations to the functions of
``workbench.cache_analysis`` (also exported by ``workbench.analysis``), and the file format lives in
``workbench.cache_files``.
"""

from __future__ import annotations

import difflib
import warnings
from typing import Callable, Iterator, Optional, Union

import torch

from . import cache_analysis
from .cache_analysis import PosSlice, slice_pos
from .cache_files import (FILE_FORMAT, FILE_FORMAT_VERSION, CacheMismatchError, check_hook_shapes, check_weights,
                          read_cache_file, write_cache_file)
from .fingerprint import weights_fingerprint, weights_state
from .hook_names import HookNameError, act_name
from .tl_gqa import warn_if_regrouped
from .weights import model_weight

from .tl_cache import TLCacheMixin

NamesFilter = Union[None, str, list, tuple, set, Callable[[str], bool]]

__all__ = ["ActivationCache", "CacheMismatchError", "Deferred", "FILE_FORMAT", "FILE_FORMAT_VERSION", "NamesFilter",
           "PosSlice", "expand_name", "model_weight", "names_filter_fn", "slice_pos"]


def names_filter_fn(names_filter: NamesFilter) -> Callable[[str], bool]:
    """``names_filter`` (None, a name, a list of names or a predicate) as a predicate ``str -> bool``."""
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
    """``("pattern", 3)`` -> ``"blocks.3.attn.hook_pattern"``; ``"scale"`` -> ``"ln_final.hook_scale"``;
    full names pass through. Negative layers count from the end when ``n_layers`` is known."""
    if isinstance(key, str):
        return act_name(key)
    if not isinstance(key, tuple) or not key:
        raise KeyError(f"bad cache key {key!r}; give a hook name or (kind, layer), e.g. ('pattern', 0)")
    kind, *rest = key
    layer = rest[0] if rest else None
    sub = rest[1] if len(rest) > 1 else None
    if isinstance(layer, int) and layer < 0 and n_layers is not None:
        layer += n_layers
    return act_name(kind, layer, sub)


class Deferred:
    """A cache entry computed on first access (e.g. per-head results from the cached z)."""

    __slots__ = ("fn",)

    def __init__(self, fn) -> None:
        self.fn = fn


class _CacheDict(dict):
    """A dict whose ``Deferred`` values are computed (once) when read."""

    def __getitem__(self, key):
        value = dict.__getitem__(self, key)
        if isinstance(value, Deferred):
            value = value.fn()
            dict.__setitem__(self, key, value)
        return value

    def get(self, key, default=None):
        return self[key] if key in self else default

    def values(self):
        return [self[k] for k in self]

    def items(self):
        return [(k, self[k]) for k in self]


class ActivationCache(TLCacheMixin):
    """A read-only mapping of hook name -> activation tensor from one forward.

    ``metadata`` may hold ``tokens`` (the prompt, LongTensor [batch pos]) and ``fingerprint`` (the
    model's ``cfg.fingerprint()``); both are written by :meth:`save` and restored by :meth:`load`.
    """

    def __init__(self, cache: dict, model=None, metadata: Optional[dict] = None) -> None:
        self.cache_dict = _CacheDict(cache)
        self.model = model
        self.metadata = dict(metadata or {})
        cfg = getattr(model, "cfg", None)
        self.n_layers = cfg.n_layers if cfg is not None else self.metadata.get("n_layers")

    def _name(self, key) -> str:
        return expand_name(key, self.n_layers)

    def __getitem__(self, key) -> torch.Tensor:
        name = self._name(key)
        if name not in self.cache_dict:
            close = difflib.get_close_matches(name, list(self.cache_dict), n=5, cutoff=0.5)
            raise KeyError(f"{name!r} is not in the cache" + (f"; closest: {close}" if close else ""))
        value = self.cache_dict[name]
        warn_if_regrouped(name, value, self.model)      # GQA switch flipped since the forward (tl_gqa)
        return value

    def __contains__(self, key) -> bool:
        try:
            return self._name(key) in self.cache_dict
        except (KeyError, HookNameError):
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

    # ------------------------------------------------------------------ residual stream (cache_analysis)
    def accumulated_resid(self, layer: Optional[int] = None, incl_final: bool = True, return_labels: bool = True,
                          apply_ln: bool = False, pos_slice: PosSlice = None):
        """See ``workbench.cache_analysis.accumulated_resid``. Example: ``cache.accumulated_resid(pos_slice=-1)``."""
        return cache_analysis.accumulated_resid(self, layer, incl_final, return_labels, apply_ln, pos_slice)

    def decompose_resid(self, layer: Optional[int] = None, mode: str = "all", incl_embeds: bool = True,
                        return_labels: bool = True, apply_ln: bool = False, pos_slice: PosSlice = None):
        """See ``workbench.cache_analysis.decompose_resid``. Example: ``cache.decompose_resid(pos_slice=-1)``."""
        return cache_analysis.decompose_resid(self, layer, mode, incl_embeds, return_labels, apply_ln, pos_slice)

    def head_results(self, layer: int) -> torch.Tensor:
        """See ``workbench.cache_analysis.head_results``. Example: ``cache.head_results(2)``."""
        return cache_analysis.head_results(self, layer)

    def stack_head_results(self, layer: Optional[int] = -1, pos_slice: PosSlice = None, return_labels: bool = True,
                           apply_ln: bool = False):
        """See ``workbench.cache_analysis.stack_head_results``. Example: ``cache.stack_head_results(pos_slice=-1)``."""
        return cache_analysis.stack_head_results(self, layer, pos_slice, return_labels, apply_ln)

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: Optional[int] = None,
                          pos_slice: PosSlice = None, recompute_ln: bool = False) -> torch.Tensor:
        """See ``workbench.cache_analysis.apply_ln_to_stack``. Example: ``cache.apply_ln_to_stack(parts, pos_slice=-1)``."""
        return cache_analysis.apply_ln_to_stack(self, residual_stack, layer, pos_slice, recompute_ln)

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None,
                    pos_slice: PosSlice = None) -> torch.Tensor:
        """See ``workbench.cache_analysis.logit_attrs``. Example: ``cache.logit_attrs(parts, tokens=answer)``."""
        return cache_analysis.logit_attrs(self, residual_stack, tokens, incorrect_tokens, pos_slice)

    # ------------------------------------------------------------------ files (cache_files)
    def save(self, path, tokens=None) -> None:
        """Write every tensor to a safetensors file, with the hook names (in order), the prompt
        ``tokens`` (argument or ``metadata["tokens"]``), the model's config fingerprint and its weights
        fingerprint (``workbench.fingerprint.weights_fingerprint``: sampled slices of every tensor,
        milliseconds even for a 35B model) as metadata. If the weights were edited in place since the
        forward that made this cache, no weights fingerprint is written (with a warning), and
        :meth:`load` with a model then needs ``allow_other_weights=True``.

        Example::

            logits, cache = model.run_with_cache(ids)
            cache.save("clean.safetensors", tokens=ids)
        """
        fingerprint = self.metadata.get("fingerprint")
        weights = self.metadata.get("weights_fingerprint")
        if getattr(self.model, "cfg", None) is not None:
            fingerprint = self.model.cfg.fingerprint()
            made_with = self.metadata.get("weights_state")
            if made_with is not None and made_with != weights_state(self.model):
                warnings.warn("ActivationCache.save: the model's weights changed since the forward that made this "
                              "cache; the file records no weights fingerprint", UserWarning, stacklevel=2)
                weights = None
            elif made_with is not None or weights is None:
                weights = _weights_fingerprint(self.model)
        tokens = tokens if tokens is not None else self.metadata.get("tokens")
        write_cache_file(path, dict(self.cache_dict.items()), fingerprint, self.n_layers, tokens, weights)

    @classmethod
    def load(cls, path, model=None, device=None, strict: bool = True,
             allow_other_weights: bool = False) -> "ActivationCache":
        """Read a cache written by :meth:`save` (bitwise the same tensors, in the same order).

        With ``model``, the saved config fingerprint must equal ``model.cfg.fingerprint()``, the saved
        weights fingerprint must equal ``weights_fingerprint(model)`` and every tensor must fit the
        model's hook table (rank, dtype, model dimensions); otherwise ``CacheMismatchError`` says what
        differs. ``strict=False`` only allows a file without fingerprints (a warning for the weights);
        ``allow_other_weights=True`` loads a cache of other weights (or of unknown ones) with a warning.
        ``metadata["tokens"]`` holds the prompt if it was saved.

        Example::

            cache = ActivationCache.load("clean.safetensors", model=model)
        """
        expected = model.cfg.fingerprint() if model is not None else None
        tensors, metadata = read_cache_file(path, expected, strict, device)
        if model is not None:
            path = metadata["path"]
            check_weights(path, metadata.get("weights_fingerprint"), _weights_fingerprint(model), allow_other_weights,
                          strict)
            check_hook_shapes(path, tensors, model.hook_table())
        return cls(tensors, model, metadata)


def _weights_fingerprint(model) -> str:
    # reading a memory-mapped weight whose file was truncated would kill the process: check first
    files = getattr(model, "mapped_files", None)
    if files is not None:
        files.check()
    return weights_fingerprint(model)
