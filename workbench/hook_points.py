"""HookPoint (an identity module with a name) and the machinery that attaches hook functions.

A hook function is ``fn(tensor, hook) -> tensor | None``. ``hook.name`` is the hook's full name
(``"blocks.3.attn.hook_pattern"``), ``hook.layer`` its block index (None outside blocks) and
``hook.ctx`` the forward's context: ``ctx.positions`` (absolute positions of the tensor's ``pos``
axis, ``[batch or 1, pos]``), ``ctx.past_len`` (tokens already in the KV cache) and ``ctx.step``
(None outside ``generate``; 0 for the prefill, 1, 2, ... for decode steps).

Hooks are only ever added inside context managers that remove them in ``finally``: an exception in
a hook, a KeyboardInterrupt or a ``StopForward`` never leaves a hook attached.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

HookFn = Callable[[torch.Tensor, "HookPoint"], Optional[torch.Tensor]]
NameOrPredicate = Union[str, Callable[[str], bool]]
HookList = Iterable[tuple]


class StopForward(Exception):
    """Raise from a hook to end the forward early (e.g. after recording layer 3).

    ``run_with_hooks``/``run_with_cache`` catch it and return ``None`` logits."""


class HookError(ValueError):
    """A hook name that does not exist, or a hook that returned a tensor of the wrong shape/dtype."""


@dataclass
class HookContext:
    """What a hook may want to know about the forward it is called from."""

    positions: Optional[torch.Tensor] = None  # [batch or 1, pos], absolute positions
    past_len: int = 0                         # positions already in the KV cache
    step: Optional[int] = None                # generation step (0 = prefill) or None


class HookPoint(nn.Module):
    """Identity module; hook functions registered on it may read or replace the tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self.layer: Optional[int] = None
        self.ctx: HookContext = HookContext()
        self._fwd: list[HookFn] = []
        self._bwd: list[HookFn] = []

    @property
    def has_hooks(self) -> bool:
        return bool(self._fwd or self._bwd)

    def add_hook(self, fn: HookFn, dir: str = "fwd") -> Callable[[], None]:
        """Attach ``fn``; returns a remover. Prefer ``model.hooks(...)`` which always cleans up."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        target = self._fwd if dir == "fwd" else self._bwd
        entry = _Entry(fn)
        target.append(entry)

        def remove() -> None:
            entry.active = False
            if entry in target:
                target.remove(entry)

        return remove

    def remove_hooks(self) -> None:
        for entry in self._fwd + self._bwd:
            entry.active = False
        self._fwd.clear()
        self._bwd.clear()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # With nothing attached (neither our hooks nor torch module hooks) a HookPoint is the
        # identity: skip nn.Module.__call__ (~130 calls per forward, most of them in decode steps).
        if self._fwd or self._bwd or self._forward_hooks or self._forward_pre_hooks or _global_module_hooks():
            return super().__call__(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for entry in tuple(self._fwd):
            out = entry.fn(x, self)
            if out is not None:
                _check_return(self.name, out, x)
                x = out
        if self._bwd and x.requires_grad:
            for entry in tuple(self._bwd):
                x.register_hook(_grad_hook(entry, self))
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def _global_module_hooks() -> bool:
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks)


class _Entry:
    __slots__ = ("fn", "active")

    def __init__(self, fn: HookFn) -> None:
        self.fn = fn
        self.active = True

    def __eq__(self, other) -> bool:  # identity semantics for list.remove
        return self is other

    __hash__ = object.__hash__


def _check_return(name: str, out, x: torch.Tensor) -> None:
    if (not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype
            or out.device != x.device):
        got = (tuple(out.shape), out.dtype, str(out.device)) if isinstance(out, torch.Tensor) else type(out).__name__
        raise HookError(
            f"hook on {name!r} returned {got}; expected a tensor of shape {tuple(x.shape)}, "
            f"dtype {x.dtype} on {x.device} (or None to leave it unchanged)"
        )


def _grad_hook(entry: _Entry, hook: HookPoint):
    # A gradient hook lives on the autograd graph, which can outlive the ``hooks()`` block; once
    # the entry was removed it does nothing.
    def fn(grad: torch.Tensor):
        if not entry.active:
            return None
        out = entry.fn(grad, hook)
        if out is not None:
            _check_return(hook.name + " (backward)", out, grad)
        return out

    return fn


def _deferred_result_saver(name: str, attn, store: dict, device):
    """A hook on ``hook_z`` that stores ``name`` (an ``attn.hook_result``) as a deferred einsum."""
    from .activation_cache import Deferred

    def save(z: torch.Tensor, hook: HookPoint) -> None:
        z = z.detach()
        # Taken inside the forward: under accelerate offload this is the weight loaded for the block
        # (outside the forward the parameter is on the meta device).
        weight = attn.o_proj.weight.detach()
        version = attn.o_proj.weight._version
        param = attn.o_proj.weight

        def compute() -> torch.Tensor:
            if param is attn.o_proj.weight and param._version != version:
                raise RuntimeError(f"{name}: o_proj.weight was modified after the forward that filled this "
                                   f"cache; re-run run_with_cache to get per-head results")
            with torch.no_grad():
                result = attn._per_head_result(z, weight)  # [batch pos head d_model]
            return result.to(device) if device is not None else result

        store[name] = Deferred(compute)

    return save


_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


class HookedRootModule(nn.Module):
    """Mixin for the root model: registry of HookPoints and hooks()/run_with_hooks()/run_with_cache()."""

    hook_ctx: HookContext

    def setup_hooks(self) -> None:
        """Name every HookPoint after its module path and share one context object."""
        self.hook_ctx = HookContext()
        self._hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                m = _LAYER_RE.match(name)
                module.layer = int(m.group(1)) if m else None
                module.ctx = self.hook_ctx
                self._hook_dict[name] = module

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook name -> HookPoint, in forward order."""
        return dict(self._hook_dict)

    def _resolve(self, name: NameOrPredicate) -> list[HookPoint]:
        if callable(name):
            return [hp for n, hp in self._hook_dict.items() if name(n)]
        if name in self._hook_dict:
            return [self._hook_dict[name]]
        close = difflib.get_close_matches(name, list(self._hook_dict), n=5, cutoff=0.5)
        hint = f"; closest: {close}" if close else ""
        raise HookError(f"unknown hook name {name!r}{hint}. model.hook_dict lists all {len(self._hook_dict)} names")

    def _attach(self, hooks: Optional[HookList], dir: str, removers: list) -> None:
        for item in hooks or ():
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[1])):
                raise HookError(f"{dir} hooks must be (name or predicate, fn) pairs, got {item!r}")
            name, fn = item
            for hp in self._resolve(name):
                removers.append(hp.add_hook(fn, dir))

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Optional[HookList] = None, bwd_hooks: Optional[HookList] = None):
        """Attach hooks for the duration of the block (including any ``.backward()`` inside it).

        Example::

            with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x * 0)]):
                logits = model(tokens)
        """
        removers: list = []
        try:
            # Resolve every name first: a bad name raises before anything is attached.
            for item in list(fwd_hooks or ()) + list(bwd_hooks or ()):
                if isinstance(item, (tuple, list)) and len(item) == 2 and not callable(item[0]):
                    self._resolve(item[0])
            self._attach(fwd_hooks, "fwd", removers)
            self._attach(bwd_hooks, "bwd", removers)
            yield self
        finally:
            for remove in reversed(removers):
                remove()

    def reset_hooks(self) -> None:
        """Remove every hook from every HookPoint."""
        for hp in self._hook_dict.values():
            hp.remove_hooks()

    def run_with_hooks(self, input_ids, *args, fwd_hooks=None, bwd_hooks=None, **kwargs):
        """Forward with temporary hooks; returns the logits (None if a hook raised StopForward)."""
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            try:
                return self(input_ids, *args, **kwargs)
            except StopForward:
                return None

    def _defer_results(self, cache_hooks: list, user_hooks: list, device, store: dict) -> list:
        """Replace cache-only listeners of ``attn.hook_result`` by a deferred einsum on ``hook_z``."""
        def user_listens(name: str) -> bool:
            return any((n(name) if callable(n) else n == name) for n, _ in user_hooks)

        out = []
        for name, fn in cache_hooks:
            hp = self._hook_dict[name]
            attn = self.get_submodule(name.rsplit(".", 1)[0]) if name.endswith("attn.hook_result") else None
            if attn is None or hp.has_hooks or user_listens(name) or not attn.can_defer_result():
                out.append((name, fn))
                continue
            out.append((name.replace("hook_result", "hook_z"), _deferred_result_saver(name, attn, store, device)))
        return out

    def cache_hooks(self, names_filter=None, device=None, store: Optional[dict] = None):
        """(store, fwd_hooks) that copy every selected activation into ``store`` (detached)."""
        from .activation_cache import names_filter_fn

        if isinstance(names_filter, str):
            self._resolve(names_filter)            # a typo raises with the closest names
        elif isinstance(names_filter, (list, tuple, set)):
            for name in names_filter:
                self._resolve(name)
        keep = names_filter_fn(names_filter)
        store = {} if store is None else store

        def save(x: torch.Tensor, hook: HookPoint) -> None:
            t = x.detach()
            store[hook.name] = t.to(device) if device is not None else t

        return store, [(n, save) for n in self._hook_dict if keep(n)]

    def run_with_cache(self, input_ids, *args, names_filter=None, device=None, fwd_hooks=None, **kwargs):
        """Forward once, recording activations. Returns ``(logits, ActivationCache)``.

        ``names_filter``: None (all), a name, a list of names, or a predicate ``str -> bool``.
        ``device``: where the cached tensors are gathered (e.g. "cpu" under offload).

        Per-head ``hook_result`` tensors that only the cache listens to are computed from the
        cached ``z`` when first read (the same einsum the hooked path runs), so caching every hook
        costs little more than a forward; a hook on ``hook_result`` gets the eager path.
        """
        from .activation_cache import ActivationCache

        user_hooks = list(fwd_hooks or ())
        store, cache_hooks = self.cache_hooks(names_filter, device)
        cache_hooks = self._defer_results(cache_hooks, user_hooks, device, store)
        logits = self.run_with_hooks(input_ids, *args, fwd_hooks=user_hooks + cache_hooks, **kwargs)
        tokens = input_ids.detach().cpu() if isinstance(input_ids, torch.Tensor) else None
        return logits, ActivationCache(store, self, metadata={"tokens": tokens})
