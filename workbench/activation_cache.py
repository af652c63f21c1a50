"""ActivationCache: hook name -> tensor, with TransformerLens-style shorthand.

Example::

    logits, cache = model.run_with_cache(tokens)
    cache["blocks.3.attn.hook_pattern"]     # full name
    cache["pattern", 3]                     # shorthand: same tensor
    cache["resid_post", -1]                 # negative layers count from the end
    cache["scale", 2, "ln1"]                # blocks.2.ln1.hook_scale
    cache["logits"]                         # hook_logits

    resid, labels = cache.accumulated_resid()          # [n_resid batch pos d_model], "resid_pre 0", ...
    parts, labels = cache.decompose_resid()            # embed, attn_out 0, mlp_out 0, ... (sums to resid)
    heads, labels = cache.stack_head_results()         # [layer*head batch pos d_model], "L0H0", ...
    cache.logit_attrs(parts, tokens=answer_ids)        # [component batch pos], frozen ln_final scale
    cache.save("run.safetensors", tokens=ids)
    ActivationCache.load("run.safetensors", model=model)   # refuses a model with another config

Command-R's block is parallel (one LayerNorm feeds attention and MLP), so there is no
``resid_mid``: ``resid_post[l] = resid_pre[l] + attn_out[l] + mlp_out[l]``.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Iterator, Optional, Union

import torch
from einops import rearrange

from .tl_cache import TLCacheMixin

NamesFilter = Union[None, str, list, tuple, set, Callable[[str], bool]]

FILE_FORMAT = "workbench.activation_cache"
FILE_FORMAT_VERSION = "1"
PosSlice = Union[None, int, slice, list, tuple, torch.Tensor]


class CacheMismatchError(ValueError):
    """A saved cache does not belong to the model it is being loaded for (or is not a cache file)."""


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


def model_weight(model, name: str) -> torch.Tensor:
    """The value of parameter ``name`` (e.g. ``"ln_final.weight"``), also under accelerate offload.

    With ``cpu_offload``/``disk_offload``/``device_map`` offload, accelerate keeps offloaded weights on
    the meta device outside forward and stores their values in the ``weights_map`` of an
    ``AlignDevicesHook`` attached to the module or one of its parents (``module._hf_hook``); read it
    from there. Raises a clear error when the value cannot be found.

    Example::

        w = model_weight(model, "blocks.0.attn.o_proj.weight")      # [d_model, head*d_head]
    """
    param = model.get_parameter(name)
    if param.device.type != "meta":
        return param
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):  # the owning module first, then its parents
        module = model.get_submodule(".".join(parts[:cut])) if cut else model
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            weights_map = getattr(h, "weights_map", None)
            if weights_map is None:
                continue
            try:
                return weights_map[".".join(parts[cut:])]
            except KeyError:
                continue
    raise RuntimeError(
        f"parameter {name!r} is on the meta device and no accelerate offload weights_map holds it; "
        "load real weights (or read activations, which are always real) before this analysis"
    )


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

    # ------------------------------------------------------------------ residual stream views
    def _need_model(self, what: str):
        if self.model is None:
            raise ValueError(f"{what} needs the model's weights; this cache has none "
                             "(use ActivationCache.load(path, model=model) or model.run_with_cache)")
        return self.model

    def _layers_upto(self, layer: Optional[int], what: str) -> int:
        """Number of whole layers before ``layer`` (None, -1 and n_layers mean all of them)."""
        L = self.n_layers
        if L is None:
            raise ValueError(f"{what}: the cache does not know n_layers (no model and no fingerprint)")
        if layer is None or layer == -1:
            return L
        if not isinstance(layer, int) or not 0 <= layer <= L:
            raise ValueError(f"{what}: layer must be None, -1 or in [0, {L}], got {layer!r}")
        return layer

    def accumulated_resid(self, layer: Optional[int] = None, incl_final: bool = True,
                          return_labels: bool = True, apply_ln: bool = False, pos_slice: PosSlice = None):
        """The residual stream before each layer: ``[n_resid batch pos d_model]`` (and labels).

        ``layer=None`` (or -1, or n_layers): ``resid_pre`` of every layer plus the final
        ``resid_post`` (if ``incl_final``); ``layer=k < n_layers``: ``resid_pre`` 0..k (TransformerLens'
        habit). Labels are ``"resid_pre 0"`` ... ``"resid_post {L-1}"``, as in the logit lens.
        ``apply_ln=True`` applies the final LayerNorm to each residual with ITS OWN statistics (the
        standard logit lens; reusing the final residual's scale for every layer is a known bug in other
        tools) and returns float32.

        Example::

            resid, labels = cache.accumulated_resid(pos_slice=-1)     # [n_resid batch d_model]
        """
        L = self._layers_upto(layer, "accumulated_resid")
        n_pre = min(L + 1, self.n_layers) if layer not in (None, -1) else self.n_layers
        parts = [slice_pos(self["resid_pre", i], pos_slice) for i in range(n_pre)]
        labels = [f"resid_pre {i}" for i in range(n_pre)]
        if L == self.n_layers and incl_final:
            parts.append(slice_pos(self["resid_post", self.n_layers - 1], pos_slice))
            labels.append(f"resid_post {self.n_layers - 1}")
        stack = torch.stack(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, pos_slice=pos_slice, recompute_ln=True)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: Optional[int] = None, mode: str = "all", incl_embeds: bool = True,
                        return_labels: bool = True, apply_ln: bool = False, pos_slice: PosSlice = None):
        """The residual before ``layer`` split into what wrote it: ``[component batch pos d_model]``.

        Components, in order: ``"embed"`` (``hook_embed``), then per layer ``"attn_out {l}"`` and
        ``"mlp_out {l}"`` (``mode`` "attn" or "mlp" keeps one kind). With everything included, a
        running sum in that order reproduces ``resid_pre``/``resid_post`` bit for bit (it is the
        model's own sequence of additions). ``apply_ln=True``: the final LayerNorm linearised with the
        cached scale (see :meth:`apply_ln_to_stack`).

        Example::

            parts, labels = cache.decompose_resid(pos_slice=-1)       # [1 + 2L, batch, d_model]
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode: expected 'all', 'attn' or 'mlp', got {mode!r}")
        L = self._layers_upto(layer, "decompose_resid")
        parts, labels = [], []
        if incl_embeds:
            parts.append(slice_pos(self["embed"], pos_slice))
            labels.append("embed")
        for i in range(L):
            for kind in ("attn_out", "mlp_out"):
                if mode in ("all", kind[:-4]):
                    parts.append(slice_pos(self[kind, i], pos_slice))
                    labels.append(f"{kind} {i}")
        stack = torch.stack(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer=layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def head_results(self, layer: int) -> torch.Tensor:
        """Per-head outputs of ``layer`` ``[batch pos head d_model]``: ``hook_result`` if cached, else
        ``hook_z`` × W_O computed with the model's own einsum (bitwise equal to ``hook_result``).

        Example::

            cache.head_results(2)[:, -1, 5]        # head 5 of layer 2 at the last position [batch d_model]
        """
        if ("result", layer) in self:
            return self["result", layer]
        if ("z", layer) not in self:
            raise KeyError(f"neither blocks.{layer}.attn.hook_result nor blocks.{layer}.attn.hook_z is "
                           "in the cache; cache one of them (names_filter)")
        model = self._need_model("head results from hook_z")
        z = self["z", layer]
        W = model_weight(model, f"blocks.{layer}.attn.o_proj.weight").to(z.device)
        W_O = rearrange(W, "m (h d) -> h d m", h=z.shape[2])          # [head d_head d_model]
        return torch.einsum("bshd,hdm->bshm", z, W_O)

    def stack_head_results(self, layer: Optional[int] = -1, pos_slice: PosSlice = None,
                           return_labels: bool = True, apply_ln: bool = False):
        """Every head's output before ``layer`` (-1/None: all layers): ``[layer*head batch pos d_model]``.

        Labels ``"L{layer}H{head}"``. Taken from ``hook_result`` when cached, otherwise computed from
        ``hook_z`` and the model's ``W_O``. The heads of a layer sum to its ``attn_out`` up to float
        rounding (the model's fused ``o_proj`` adds in another order).

        Example::

            heads, labels = cache.stack_head_results(pos_slice=-1)    # [L*H, batch, d_model]
        """
        L = self._layers_upto(layer, "stack_head_results")
        parts, labels = [], []
        for i in range(L):
            r = slice_pos(self.head_results(i), pos_slice)            # [batch (pos) head d_model]
            parts.append(rearrange(r, "b ... h m -> h b ... m"))
            labels += [f"L{i}H{h}" for h in range(r.shape[-2])]
        if not parts:
            raise ValueError("stack_head_results: layer=0 selects no heads")
        stack = torch.cat(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: Optional[int] = None,
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

            parts, _ = cache.decompose_resid(pos_slice=-1)
            normed = cache.apply_ln_to_stack(parts, pos_slice=-1)   # sums to ln_final's output
        """
        model = self._need_model("apply_ln_to_stack")
        final = layer is None or layer == -1 or layer == self.n_layers
        prefix = "ln_final" if final else f"blocks.{self._layers_upto(layer, 'apply_ln_to_stack')}.ln1"
        norm = model.get_submodule(prefix)
        weight = model_weight(model, f"{prefix}.weight").to(residual_stack.device, torch.float32)
        x = residual_stack.to(torch.float32)
        if recompute_ln:
            from .model import layer_norm_fp32

            return layer_norm_fp32(x, weight, norm.eps)
        scale_name = f"{prefix}.hook_scale"
        if scale_name not in self.cache_dict:
            raise KeyError(f"{scale_name!r} is not in the cache: the frozen LayerNorm scale is needed; "
                           "include it in run_with_cache's names_filter")
        scale = slice_pos(self.cache_dict[scale_name], pos_slice).to(x.device, torch.float32)  # [batch (pos) 1]
        if scale.shape[:-1] != x.shape[1:-1]:
            raise ValueError(f"apply_ln_to_stack: residual_stack {tuple(x.shape)} does not match the cached "
                             f"{scale_name} {tuple(scale.shape)} [batch (pos) 1]; pass the same pos_slice")
        centred = x - x.mean(-1, keepdim=True)
        return centred / scale * weight

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None,
                    pos_slice: PosSlice = None) -> torch.Tensor:
        """Direct logit attribution of each component: ``[component batch (pos)]`` float32.

        Each component goes through the final LayerNorm with its scale frozen (see
        :meth:`apply_ln_to_stack`), is projected on the unembedding of ``tokens`` (minus that of
        ``incorrect_tokens``) and multiplied by ``logit_scale``; the components sum to the logit (or
        logit difference) of the real forward. ``tokens``: an int, or a LongTensor broadcastable to
        the stack's ``[batch (pos)]`` axes.

        Example::

            parts, labels = cache.decompose_resid(pos_slice=-1)
            attrs = cache.logit_attrs(parts, tokens=answer, incorrect_tokens=wrong, pos_slice=-1)
        """
        model = self._need_model("logit_attrs")
        normed = self.apply_ln_to_stack(residual_stack, pos_slice=pos_slice)     # [component batch (pos) d_model]
        W_U = model_weight(model, "unembed.weight")                               # [vocab d_model]
        direction = _token_rows(W_U, tokens, "tokens", normed.device)
        if incorrect_tokens is not None:
            direction = direction - _token_rows(W_U, incorrect_tokens, "incorrect_tokens", normed.device)
        return (normed * direction).sum(-1) * model.cfg.logit_scale

    # ------------------------------------------------------------------ files
    def save(self, path, tokens=None) -> None:
        """Write every tensor to a safetensors file, with the hook names (in order), the prompt
        ``tokens`` (argument or ``metadata["tokens"]``) and the model's config fingerprint as metadata.

        Example::

            logits, cache = model.run_with_cache(ids)
            cache.save("clean.safetensors", tokens=ids)
        """
        from safetensors.torch import save_file

        tensors, storages = {}, set()
        for name, t in self.cache_dict.items():
            if t.device.type == "meta":
                raise ValueError(f"cannot save {name!r}: it is on the meta device")
            t = t.detach().to("cpu").contiguous()
            storage = t.untyped_storage()
            # resid_post[l] and resid_pre[l+1] are one tensor; safetensors refuses shared storage
            if storage.data_ptr() in storages or storage.nbytes() != t.numel() * t.element_size():
                t = t.clone()
            storages.add(t.untyped_storage().data_ptr())
            tensors[name] = t
        meta = {"format": FILE_FORMAT, "format_version": FILE_FORMAT_VERSION,
                "hook_names": json.dumps(list(self.cache_dict))}
        fingerprint = self.metadata.get("fingerprint")
        if getattr(self.model, "cfg", None) is not None:
            fingerprint = self.model.cfg.fingerprint()
        if fingerprint is not None:
            meta["fingerprint"] = json.dumps(fingerprint)
        if self.n_layers is not None:
            meta["n_layers"] = str(self.n_layers)
        tokens = tokens if tokens is not None else self.metadata.get("tokens")
        if tokens is not None:
            meta["tokens"] = json.dumps(torch.as_tensor(tokens).tolist())
        save_file(tensors, os.fspath(path), metadata=meta)

    @classmethod
    def load(cls, path, model=None, device=None, strict: bool = True) -> "ActivationCache":
        """Read a cache written by :meth:`save` (bitwise the same tensors, in the same order).

        With ``model``, the saved config fingerprint must equal ``model.cfg.fingerprint()``; otherwise
        ``CacheMismatchError`` names every differing field (``strict=False`` only allows a file
        without a fingerprint). ``metadata["tokens"]`` holds the prompt if it was saved.

        Example::

            cache = ActivationCache.load("clean.safetensors", model=model)
        """
        from safetensors import safe_open

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"activation cache file not found: {path}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FILE_FORMAT:
                    raise CacheMismatchError(f"{path}: not an ActivationCache file (metadata format="
                                             f"{meta.get('format')!r}, expected {FILE_FORMAT!r})")
                names = json.loads(meta["hook_names"])
                if set(names) != set(f.keys()):
                    raise CacheMismatchError(f"{path}: hook_names metadata does not match the stored tensors")
                fingerprint = json.loads(meta["fingerprint"]) if "fingerprint" in meta else None
                if model is not None:
                    _check_fingerprint(path, fingerprint, model.cfg.fingerprint(), strict)
                tensors = {n: f.get_tensor(n) for n in names}
        except CacheMismatchError:
            raise
        except Exception as e:  # a truncated or foreign file
            raise CacheMismatchError(f"{path}: cannot read as an ActivationCache file ({e})") from e
        if device is not None:
            tensors = {n: t.to(device) for n, t in tensors.items()}
        metadata = {"fingerprint": fingerprint, "path": path}
        if "tokens" in meta:
            metadata["tokens"] = torch.tensor(json.loads(meta["tokens"]), dtype=torch.long)
        if "n_layers" in meta:
            metadata["n_layers"] = int(meta["n_layers"])
        return cls(tensors, model, metadata)


def _check_fingerprint(path: str, saved: Optional[dict], current: dict, strict: bool) -> None:
    if saved is None:
        if strict:
            raise CacheMismatchError(f"{path}: has no model config fingerprint, so it cannot be checked "
                                     "against this model; pass strict=False to load it anyway")
        return
    current = json.loads(json.dumps(current))  # same JSON normalisation as the saved side
    diffs = [f"{k} (cache {saved.get(k)!r}, model {current.get(k)!r})"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CacheMismatchError(f"{path}: saved from a model with a different config: {'; '.join(diffs)}. "
                                 "Load it with the model it came from, or with model=None to inspect it")


def _token_rows(W_U: torch.Tensor, tokens, what: str, device) -> torch.Tensor:
    """Unembedding rows of ``tokens`` as float32 ``[... d_model]``."""
    ids = torch.as_tensor(tokens)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{what}: expected integer token ids, got dtype {ids.dtype}")
    ids = ids.long()
    if ((ids < 0) | (ids >= W_U.shape[0])).any():
        raise ValueError(f"{what}: token ids must be in [0, {W_U.shape[0]}), got {ids.tolist()}")
    return W_U[ids.to(W_U.device)].to(device, torch.float32)
