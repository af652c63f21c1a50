"""TransformerLens' ActivationCache methods on ours (a mixin): ``remove_batch_dim``,
``compute_head_results``, ``stack_activation``, ``get_neuron_results``, ``stack_neuron_results``,
``get_full_resid_decomposition``, ``apply_slice_to_batch_dim``, TL's keyword arguments on the
residual-stream views, and TL's key aliases (``cache["attn", 0]`` = the pattern).

Command-R's block is parallel (attention and MLP both read ``ln1(resid_pre)``), so there is no
``resid_mid``: ``incl_mid=True`` raises, and ``mlp_input=True`` decomposes the same residual as
``mlp_input=False`` (the MLP's input IS the layer's input). There are no biases, so the ``"bias"``
component of ``get_full_resid_decomposition`` is zeros.

After ``remove_batch_dim()`` (a batch of one), the residual-stream views accept and return tensors
without the batch axis, as TL's do.

Example::

    logits, cache = model.run_with_cache(tokens)
    parts, labels = cache.get_full_resid_decomposition(pos_slice=-1, return_labels=True)
    # heads "L0H0".., neurons "L0N0".., "embed", "bias": they sum to the final resid_post
    neurons, labels = cache.stack_neuron_results(layer=2, pos_slice=-1, return_labels=True)
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from einops import rearrange

from .hook_names import block_name, get_act_name

_NO_MID = ("Command-R's block is parallel: attention and MLP both read ln1(resid_pre), so there is no "
           "resid_mid; use incl_mid=False (resid_post[l] = resid_pre[l] + attn_out[l] + mlp_out[l])")

# method -> (accepts TL's incl_mid, its residual_stack argument lacks the batch axis when batchless)
_TL_VIEWS = {"accumulated_resid": (True, False), "decompose_resid": (True, False), "stack_head_results": (False, False),
             "apply_ln_to_stack": (False, True), "logit_attrs": (False, True), "head_results": (False, False)}


def _squeeze_result(out, axis: int):
    if isinstance(out, tuple):
        return (_squeeze_result(out[0], axis),) + out[1:]
    return out.select(axis, 0) if isinstance(out, torch.Tensor) else out


def _tl_view(method, incl_mid_ok: bool, stack_input: bool):
    """Wrap a residual-stream view: TL's extra keywords, and batchless caches (remove_batch_dim)."""
    @functools.wraps(method)
    def wrapper(self, *args, incl_mid: bool = False, mlp_input: bool = False, batch_slice=None,
                has_batch_dim: Optional[bool] = None, **kwargs):
        if incl_mid:
            raise ValueError(f"{method.__name__}(incl_mid=True): {_NO_MID}")
        if batch_slice is not None:
            raise ValueError(f"{method.__name__}: batch_slice is not supported; use cache.apply_slice_to_batch_dim first")
        if "tokens" in kwargs or (method.__name__ == "logit_attrs" and len(args) > 1):
            args, kwargs = self._token_ids(args, kwargs)
        batchless = not self.has_batch_dim if has_batch_dim is None else not has_batch_dim
        target = self.with_batch_dim() if batchless else self
        if stack_input:
            return _call_on_stack(method, target, batchless, args, kwargs)
        if not batchless:
            return method(self, *args, **kwargs)
        return _squeeze_result(method(target, *args, **kwargs), 0 if method.__name__ == "head_results" else 1)
    return wrapper


def _call_on_stack(method, cache, batchless: bool, args, kwargs):
    """``apply_ln_to_stack`` / ``logit_attrs`` on a stack with any leading component axes (TL allows
    ``[layer head batch d_model]`` or no component axis at all) and, batchless, no batch axis."""
    stack = args[0] if args else kwargs.pop("residual_stack")
    rest = tuple(args[1:])
    layer = rest[0] if rest and method.__name__ == "apply_ln_to_stack" else kwargs.get("layer")
    final = method.__name__ == "logit_attrs" or layer in (None, -1, cache.n_layers)
    scale = cache.cache_dict.get("ln_final.hook_scale" if final else get_act_name("scale", layer, "ln1"))
    if scale is None:                                             # the method raises its own clear error
        return method(cache, stack, *rest, **kwargs)
    axes = tuple(_slice_pos(scale, kwargs.get("pos_slice"), True).shape[:-1])   # batch (pos)
    axes_in = axes[1:] if batchless else axes
    k = len(axes_in)
    if stack.dim() < k + 1 or tuple(stack.shape[stack.dim() - k - 1:-1]) != axes_in:
        raise ValueError(f"{method.__name__}: residual_stack {tuple(stack.shape)} does not end in the cached "
                         f"scale's axes {axes_in} + d_model; pass the pos_slice used to build it")
    lead = tuple(stack.shape[:stack.dim() - k - 1])
    out = method(cache, stack.reshape((-1,) + axes + stack.shape[-1:]), *rest, **kwargs)
    return out.reshape(lead + axes_in + tuple(out.shape[1 + len(axes):]))


def _model_of(cache, what: str):
    if cache.model is None:
        raise ValueError(f"{what} needs the model; this cache has none (ActivationCache.load(path, model=model))")
    return cache.model


def _param(model, name: str) -> torch.Tensor:
    p = model.get_parameter(name)
    if p.device.type == "meta":
        raise RuntimeError(f"{name}: the weight is offloaded (meta); neuron results need real weights")
    return p


class TLCacheMixin:
    """TransformerLens ActivationCache methods; see the module docstring."""

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name, (mid_ok, stack_input) in _TL_VIEWS.items():
            if name in cls.__dict__:
                setattr(cls, name, _tl_view(cls.__dict__[name], mid_ok, stack_input))
        if "__getitem__" in cls.__dict__:
            cls.__getitem__ = _with_tl_aliases(cls.__dict__["__getitem__"])

    # ------------------------------------------------------------------ batch axis
    @property
    def has_batch_dim(self) -> bool:
        return self.__dict__.get("_tl_has_batch_dim", True)

    def remove_batch_dim(self):
        """Drop the batch axis (batch of one only) from every tensor, in place; returns the cache.

        Example::

            _, cache = model.run_with_cache(tokens)         # tokens [1 pos]
            cache.remove_batch_dim()["pattern", 0].shape      # [head q_pos k_pos]
        """
        if not self.has_batch_dim:
            return self
        raw = dict(dict.items(self.cache_dict))
        for name, value in raw.items():
            if isinstance(value, torch.Tensor):
                if value.dim() == 0 or value.shape[0] != 1:
                    raise ValueError(f"remove_batch_dim: {name} has batch size {tuple(value.shape)[:1]}; "
                                     "it only applies to a batch of one")
                dict.__setitem__(self.cache_dict, name, value[0])
            else:                              # a deferred entry (per-head results): squeeze when computed
                dict.__setitem__(self.cache_dict, name, type(value)(functools.partial(_first_row, value.fn)))
        self.__dict__["_tl_has_batch_dim"] = False
        return self

    def with_batch_dim(self):
        """A view of this cache with a batch axis of one (the inverse of ``remove_batch_dim``)."""
        if self.has_batch_dim:
            return self
        raw = {}
        for name, value in dict.items(self.cache_dict):
            raw[name] = value[None] if isinstance(value, torch.Tensor) else \
                type(value)(functools.partial(_add_row, value.fn))
        return type(self)(raw, self.model, self.metadata)

    def apply_slice_to_batch_dim(self, batch_slice):
        """A new cache holding only ``batch_slice`` of each tensor (an int keeps a batch of one)."""
        if not self.has_batch_dim:
            raise ValueError("apply_slice_to_batch_dim: this cache has no batch axis (remove_batch_dim was called)")
        sl = slice(batch_slice, batch_slice + 1) if isinstance(batch_slice, int) and batch_slice != -1 else \
            slice(-1, None) if batch_slice == -1 else batch_slice
        return type(self)({n: v[sl] for n, v in self.cache_dict.items()}, self.model, self.metadata)

    def _token_ids(self, args, kwargs):
        """TL allows answer tokens given as strings; turn them into ids with the model's tokenizer."""
        def ids(t):
            if isinstance(t, str):
                return _model_of(self, "string tokens").to_single_token(t)
            if isinstance(t, (list, tuple)) and t and all(isinstance(s, str) for s in t):
                return [ids(s) for s in t]
            return t
        args = tuple(ids(a) if i in (1, 2) else a for i, a in enumerate(args))
        kwargs = {k: ids(v) if k in ("tokens", "incorrect_tokens") else v for k, v in kwargs.items()}
        return args, kwargs

    # ------------------------------------------------------------------ stacks
    def compute_head_results(self) -> None:
        """Store every layer's per-head output as ``blocks.{l}.attn.hook_result`` ``[batch pos head d_model]``."""
        for layer in range(self.n_layers):
            name = get_act_name("result", layer)
            if name not in self.cache_dict:
                dict.__setitem__(self.cache_dict, name, self.head_results(layer))

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: Optional[str] = None) -> torch.Tensor:
        """``[layer ...]``: the activation ``activation_name`` (TL's short name) of layers before ``layer``
        (-1: all).

        Example::

            cache.stack_activation("pattern").shape           # [layer batch head q_pos k_pos]
        """
        stop = self.n_layers if layer in (-1, None) else layer
        return torch.stack([self[get_act_name(activation_name, l, sublayer_type)] for l in range(stop)])

    def get_neuron_results(self, layer: int, neuron_slice=None, pos_slice=None) -> torch.Tensor:
        """Each MLP neuron's write to the residual: ``post[..., n] * W_out[n]`` ``[batch pos d_mlp d_model]``."""
        model = _model_of(self, "get_neuron_results")
        post = _slice_pos(self["post", layer], pos_slice, self.has_batch_dim)
        W_out = _param(model, block_name(layer, "mlp.down_proj.weight")).T.to(post.device)   # [d_mlp d_model]
        if neuron_slice is not None:
            post, W_out = post[..., neuron_slice], W_out[neuron_slice]
        return post[..., None] * W_out

    def stack_neuron_results(self, layer: int, pos_slice=None, neuron_slice=None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False):
        """Every neuron's output in layers before ``layer``: ``[layer*d_mlp batch (pos) d_model]``, labels ``"L{l}N{n}"``.
        The neurons of a layer sum to its ``mlp_out`` up to float rounding."""
        if incl_remainder:
            raise ValueError("stack_neuron_results: incl_remainder is not supported")
        stop = self.n_layers if layer in (-1, None) else layer
        parts, labels = [], []
        for l in range(stop):
            r = self.get_neuron_results(l, neuron_slice, pos_slice)        # [batch (pos) n d_model]
            parts.append(rearrange(r, "... n m -> n ... m"))
            labels += [f"L{l}N{n}" for n in range(self.model.cfg.d_mlp)[neuron_slice or slice(None)]]
        if not parts:
            raise ValueError("stack_neuron_results: layer=0 selects no neurons")
        stack = torch.cat(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer=layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def get_full_resid_decomposition(self, layer: Optional[int] = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice=None,
                                     return_labels: bool = False):
        """The residual before ``layer`` (None/-1: the final resid_post) as every head, every neuron (or
        each ``mlp_out`` with ``expand_neurons=False``), ``embed`` and a zero ``bias``: ``[component batch (pos)
        d_model]``, in TL's order. The components sum to the residual up to float rounding.
        ``mlp_input`` changes nothing (parallel block: the MLP reads the layer's input)."""
        stop = self.n_layers if layer in (-1, None) else layer
        components, labels = [], []
        if stop > 0:
            heads, head_labels = self.stack_head_results(stop, pos_slice=pos_slice, return_labels=True)
            components.append(heads)
            labels += head_labels
            if expand_neurons:
                neurons, neuron_labels = self.stack_neuron_results(stop, pos_slice=pos_slice, return_labels=True)
            else:
                neurons, neuron_labels = self.decompose_resid(stop, mode="mlp", incl_embeds=False, pos_slice=pos_slice,
                                                              return_labels=True)
            components.append(neurons)
            labels += neuron_labels
        embed = _slice_pos(self["embed"], pos_slice, self.has_batch_dim)[None]
        components.append(embed.to(components[0].dtype) if components else embed)
        labels.append("embed")
        components.append(torch.zeros_like(components[-1]))
        labels.append("bias")
        stack = torch.cat(components)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer=layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack


def _first_row(fn):
    return fn()[0]


def _add_row(fn):
    return fn()[None]


def _slice_pos(t: torch.Tensor, pos_slice, has_batch: bool) -> torch.Tensor:
    axis = 1 if has_batch else 0
    if pos_slice is None:
        return t
    if isinstance(pos_slice, int):
        return t.select(axis, pos_slice)
    if isinstance(pos_slice, slice):
        return t[(slice(None),) * axis + (pos_slice,)]
    idx = torch.as_tensor(pos_slice, dtype=torch.long, device=t.device)
    return t.index_select(axis, idx % t.shape[axis])


def _with_tl_aliases(getitem):
    """``cache[key]`` also accepts TL's aliases (``("attn", 0)``, ``"q2a"``, ``("scale", 3, "ln1")``)."""
    @functools.wraps(getitem)
    def wrapper(self, key):
        try:
            return getitem(self, key)
        except KeyError as first:
            try:
                name = get_act_name(*key) if isinstance(key, tuple) else get_act_name(key)
            except (KeyError, TypeError, ValueError):
                raise first from None
            if isinstance(key, tuple) and len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
                name = get_act_name(key[0], key[1] + self.n_layers, *key[2:])
            if name in self.cache_dict:
                return self.cache_dict[name]
            raise first from None
    return wrapper
