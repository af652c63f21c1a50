"""HookPoint (an identity module with a name) and the machinery that attaches hook functions.

A hook function is ``fn(tensor, hook) -> tensor | None``. ``hook.name`` is the hook's full name
(``"blocks.3.attn.hook_pattern"``), ``hook.layer`` its block index (None outside blocks; also
callable, ``hook.layer()``, as in TransformerLens) and ``hook.ctx`` the context of the forward it
is called from: ``ctx.positions`` (absolute positions of the tensor's ``pos`` axis, ``[batch or 1,
pos]``), ``ctx.past_len`` (tokens already in the KV cache) and ``ctx.step`` (None outside
``generate``; 0 for the prefill, 1, 2, ... for decode steps).

Hooks are scoped to a call. ``run_with_hooks``, ``run_with_cache``, ``hooks(...)`` and
``generate(fwd_hooks=...)`` put their hooks in a ``contextvars`` scope that only the forwards of
that call (on its thread) see, so concurrent calls on one model from several threads never see each
other's hooks or context. ``HookPoint.add_hook`` attaches a hook to every forward of the model, as in
TransformerLens. Scoped hooks are removed in ``finally``: an exception in a hook, a
KeyboardInterrupt or a ``StopForward`` never leaves a hook attached.

Backward hooks are registered on the forward's tensors (``tensor.register_hook``) with their own
closure, context included: autograd may run them on its own threads, where no scope is set.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn
from torch.nn.modules import module as _torch_module

from .activation_cache import ActivationCache, names_filter_fn
from .fingerprint import weights_state
from .hook_names import layer_of, suffix_of
from .kv_cache import KVCache

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
    """What a hook may want to know about the forward it is called from (one object per forward)."""

    positions: Optional[torch.Tensor] = None  # [batch or 1, pos], absolute positions
    past_len: int = 0                         # positions already in the KV cache
    step: Optional[int] = None                # generation step (0 = prefill) or None


class LayerIndex(int):
    """A block index that is also callable: ``hook.layer == 3`` and ``hook.layer() == 3`` (TransformerLens)."""

    def __call__(self) -> int:
        return int(self)


class _Scope:
    """The hooks one call added (and those of the calls it is nested in): HookPoint -> entries.
    ``edits``: a forward hook not marked ``records_only`` may edit tensors, so recorders copy."""

    __slots__ = ("fwd", "bwd", "edits")

    def __init__(self, fwd: dict, bwd: dict, edits: bool = False) -> None:
        self.fwd, self.bwd, self.edits = fwd, bwd, edits

    def extended(self, fwd: list, bwd: list) -> "_Scope":
        new_fwd, new_bwd = dict(self.fwd), dict(self.bwd)
        for table, pairs in ((new_fwd, fwd), (new_bwd, bwd)):
            for hp, entry in pairs:
                table[hp] = table.get(hp, ()) + (entry,)
        edits = self.edits or any(not getattr(entry.fn, "records_only", False) for _, entry in fwd)
        return _Scope(new_fwd, new_bwd, edits)


_EMPTY_SCOPE = _Scope({}, {})


def records_only(fn: HookFn) -> HookFn:
    """Mark a hook that only reads its tensor: recorders (``run_with_cache``) store views while every
    hook of the call is so marked, and copies once another hook could edit a tensor in place later.
    Example: ``model.run_with_cache(ids, fwd_hooks=[("hook_embed", records_only(show))])``."""
    fn.records_only = True
    return fn


def edits_possible(model: nn.Module) -> bool:
    """True when a hook that may edit tensors is attached model-wide (``add_hook``, torch module hooks)."""
    return _global_module_hooks() or any(
        hp._forward_hooks or hp._forward_pre_hooks or any(not getattr(e.fn, "records_only", False) for e in hp._wide_fwd)
        for hp in getattr(model, "_hook_dict", {}).values())
# The hooks of the call running in this context (thread / task); None when no call added any.
_SCOPE: contextvars.ContextVar[Optional[_Scope]] = contextvars.ContextVar("workbench_hook_scope", default=None)
# The context of the forward running in this context (set by the model's forward).
_FORWARD: contextvars.ContextVar[Optional[HookContext]] = contextvars.ContextVar("workbench_hook_ctx", default=None)
# The generation step of the forwards that follow in this context (set by generate).
_STEP: contextvars.ContextVar[Optional[int]] = contextvars.ContextVar("workbench_generation_step", default=None)


def begin_forward(positions: Optional[torch.Tensor], past_len: int) -> HookContext:
    """Start a forward's hook context (``hook.ctx`` for its hooks); the root module's ``__call__``
    restores the previous one when the forward returns."""
    ctx = HookContext(positions=positions, past_len=past_len, step=_STEP.get())
    _FORWARD.set(ctx)
    return ctx


def current_context() -> HookContext:
    """The hook context of the forward running on this thread (an empty one outside forwards)."""
    ctx = _FORWARD.get()
    return ctx if ctx is not None else HookContext(step=_STEP.get())


@contextlib.contextmanager
def generation_step(step: Optional[int]):
    """Forwards inside the block see ``hook.ctx.step == step`` (what ``generate`` sets per step).

    Example::

        with generation_step(0):
            model(prompt_ids, kv_cache=kv)          # hooks see hook.ctx.step == 0
    """
    token = _STEP.set(step)
    try:
        yield
    finally:
        _reset(_STEP, token, None)


def _reset(var: contextvars.ContextVar, token, fallback) -> None:
    try:
        var.reset(token)
    except ValueError:  # exited in another context than it was entered in
        var.set(fallback)


class HookPoint(nn.Module):
    """Identity module; hook functions registered on it may read or replace the tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""
        self.layer: Optional[LayerIndex] = None
        self._wide_fwd: list = []   # model-wide hooks (add_hook), seen by every call
        self._wide_bwd: list = []

    @property
    def ctx(self) -> HookContext:
        """The context of the forward this hook is called from (see the module docstring)."""
        return current_context()

    def _scoped(self) -> tuple[tuple, tuple]:
        scope = _SCOPE.get()
        if scope is None:
            return (), ()
        return scope.fwd.get(self, ()), scope.bwd.get(self, ())

    @property
    def _fwd(self) -> tuple:
        """Forward hook entries this call sees: model-wide ones, then the call's own."""
        return tuple(self._wide_fwd) + self._scoped()[0]

    @property
    def _bwd(self) -> tuple:
        """Backward hook entries this call sees: model-wide ones, then the call's own."""
        return tuple(self._wide_bwd) + self._scoped()[1]

    @property
    def has_hooks(self) -> bool:
        """True when a hook is attached model-wide or by the call running on this thread."""
        if self._wide_fwd or self._wide_bwd:
            return True
        fwd, bwd = self._scoped()
        return bool(fwd or bwd)

    @property
    def has_bwd_hooks(self) -> bool:
        """True when a backward hook is attached model-wide or by the call running on this thread."""
        return bool(self._wide_bwd or self._scoped()[1])

    def add_hook(self, fn: HookFn, dir: str = "fwd") -> Callable[[], None]:
        """Attach ``fn`` to every forward of the model (all threads); returns a remover.

        Prefer ``model.hooks(...)``, which scopes hooks to one call and always cleans up."""
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        target = self._wide_fwd if dir == "fwd" else self._wide_bwd
        entry = _Entry(fn)
        target.append(entry)

        def remove() -> None:
            entry.active = False
            if entry in target:
                target.remove(entry)

        return remove

    def remove_hooks(self) -> None:
        """Remove the model-wide hooks (a call's scoped hooks end with the call)."""
        for entry in self._wide_fwd + self._wide_bwd:
            entry.active = False
        self._wide_fwd.clear()
        self._wide_bwd.clear()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # With nothing attached (no hooks of ours, none of this call, no torch module hooks) a
        # HookPoint is the identity: skip nn.Module.__call__ (~130 calls per forward, most of them
        # in decode steps).
        if (self._wide_fwd or self._wide_bwd or self._forward_hooks or self._forward_pre_hooks
                or _global_module_hooks()):
            return super().__call__(x)
        scope = _SCOPE.get()
        if scope is None or (self not in scope.fwd and self not in scope.bwd):
            return x
        return super().__call__(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fwd, bwd = self._fwd, self._bwd
        for entry in fwd:
            out = entry.fn(x, self)
            if out is not None:
                _check_return(self.name, out, x)
                x = out
        if bwd and x.requires_grad:
            bound = BoundHook(self, current_context())
            for entry in bwd:
                x.register_hook(_grad_hook(entry, bound))
        return x

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class BoundHook:
    """What a backward hook receives as ``hook``: the HookPoint with the context of the forward
    that registered it (autograd may run the hook on another thread, outside that forward)."""

    __slots__ = ("hook_point", "ctx")

    def __init__(self, hook_point: HookPoint, ctx: HookContext) -> None:
        self.hook_point, self.ctx = hook_point, ctx

    @property
    def name(self) -> str:
        return self.hook_point.name

    @property
    def layer(self) -> Optional[LayerIndex]:
        return self.hook_point.layer

    def __getattr__(self, attr: str):
        return getattr(self.hook_point, attr)

    def __repr__(self) -> str:
        return f"BoundHook({self.name!r})"


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


class _ContextView:
    """``model.hook_ctx``: the context of the forward running on this thread. Setting ``step`` sets
    the generation step of the following forwards on this thread (``generation_step`` scopes it)."""

    @property
    def positions(self) -> Optional[torch.Tensor]:
        return current_context().positions

    @property
    def past_len(self) -> int:
        return current_context().past_len

    @property
    def step(self) -> Optional[int]:
        return current_context().step if _FORWARD.get() is not None else _STEP.get()

    @step.setter
    def step(self, value: Optional[int]) -> None:
        _STEP.set(value)


class HookedRootModule(nn.Module):
    """Mixin for the root model: registry of HookPoints and hooks()/run_with_hooks()/run_with_cache().

    ``deferred_hooks`` (set by the model): hook kind key (``hook_names.suffix_of``) -> a rule whose
    ``plan(model, name, store, device)`` returns ``(hook to listen to, fn)`` that stores a ``Deferred``
    entry for ``name``, or None. ``run_with_cache`` uses it for hooks only the cache listens to.
    """

    deferred_hooks: dict = {}

    def setup_hooks(self) -> None:
        """Name every HookPoint after its module path (and its block index)."""
        self._hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                layer = layer_of(name)
                module.layer = LayerIndex(layer) if layer is not None else None
                self._hook_dict[name] = module

    def __call__(self, *args, **kwargs):
        # A forward sets its own hook context (begin_forward); give the caller's back afterwards,
        # so a forward run from inside a hook does not change the outer forward's context.
        # Weight files mapped at load are checked first; a forward that raises (a hook's error,
        # StopForward, KeyboardInterrupt) leaves a KV cache it was extending as before the forward.
        if self.__dict__.get("mapped_files") is not None:
            self.__dict__["mapped_files"].check()
        token = _FORWARD.set(_FORWARD.get())
        try:
            return super().__call__(*args, **kwargs)
        except BaseException:
            for cache in [a for a in (*args, *kwargs.values()) if isinstance(a, KVCache)]:
                cache.rollback()
            raise
        finally:
            _reset(_FORWARD, token, None)

    @property
    def hook_ctx(self) -> _ContextView:
        """The hook context of the forward running on this thread (``hook.ctx`` inside hooks)."""
        return _ContextView()

    @property
    def hook_dict(self) -> dict[str, HookPoint]:
        """Every hook name -> HookPoint, in forward order."""
        return dict(self._hook_dict)

    def resolve_hooks(self, name: NameOrPredicate) -> list[HookPoint]:
        """The HookPoints a name or predicate selects; an unknown name raises ``HookError`` naming the
        closest names (nothing is attached). Example: ``model.resolve_hooks("blocks.0.hook_resid_pre")``."""
        if callable(name):
            return [hp for n, hp in self._hook_dict.items() if name(n)]
        if name in self._hook_dict:
            return [self._hook_dict[name]]
        close = difflib.get_close_matches(name, list(self._hook_dict), n=5, cutoff=0.5)
        hint = f"; closest: {close}" if close else ""
        raise HookError(f"unknown hook name {name!r}{hint}. model.hook_dict lists all {len(self._hook_dict)} names")

    _resolve = resolve_hooks

    def _entries(self, hooks: Optional[HookList], dir: str) -> list:
        """(HookPoint, entry) pairs for ``hooks``; raises on a bad pair or name before anything runs."""
        pairs = []
        for item in hooks or ():
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and callable(item[1])):
                raise HookError(f"{dir} hooks must be (name or predicate, fn) pairs, got {item!r}")
            name, fn = item
            pairs += [(hp, _Entry(fn)) for hp in self._resolve(name)]
        return pairs

    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Optional[HookList] = None, bwd_hooks: Optional[HookList] = None):
        """Attach hooks for the duration of the block (including any ``.backward()`` inside it).

        The hooks are seen only by forwards run inside the block on this thread (not by other
        threads using the same model). Example::

            with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x * 0)]):
                logits = model(tokens)
        """
        # Resolve every name first: a bad name raises before anything is attached.
        fwd = self._entries(fwd_hooks, "fwd")
        bwd = self._entries(bwd_hooks, "bwd")
        outer = _SCOPE.get()
        token = _SCOPE.set((outer or _EMPTY_SCOPE).extended(fwd, bwd)) if fwd or bwd else None
        try:
            yield self
        finally:
            if token is not None:
                _reset(_SCOPE, token, outer)
            for _, entry in fwd + bwd:
                entry.active = False      # a gradient hook left on the graph does nothing now

    def reset_hooks(self) -> None:
        """Remove every model-wide hook (``add_hook``) from every HookPoint."""
        for hp in self._hook_dict.values():
            hp.remove_hooks()

    def run_with_hooks(self, input_ids, *args, fwd_hooks=None, bwd_hooks=None, **kwargs):
        """Forward with temporary hooks; returns the logits (None if a hook raised StopForward).

        Example::

            logits = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: z * 0)])
        """
        with self.hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks):
            try:
                return self(input_ids, *args, **kwargs)
            except StopForward:
                return None

    def _defer(self, cache_hooks: list, user_hooks: list, device, store: dict) -> list:
        """Cache-only listeners of hooks the model can compute after the forward (``deferred_hooks``,
        e.g. per-head results from ``z``) are replaced by the listener each rule plans."""
        def user_listens(name: str) -> bool:
            return any((n(name) if callable(n) else n == name) for n, _ in user_hooks)

        out = []
        for name, fn in cache_hooks:
            rule = self.deferred_hooks.get(suffix_of(name))
            plan = None
            if rule is not None and not self._hook_dict[name].has_hooks and not user_listens(name):
                plan = rule.plan(self, name, store, device)
            out.append(plan if plan is not None else (name, fn))
        return out

    def cache_hooks(self, names_filter=None, device=None, store: Optional[dict] = None):
        """(store, fwd_hooks) that copy every selected activation into ``store`` (detached)."""
        if isinstance(names_filter, str):
            self._resolve(names_filter)            # a typo raises with the closest names
        elif isinstance(names_filter, (list, tuple, set)):
            for name in names_filter:
                self._resolve(name)
        keep = names_filter_fn(names_filter)
        store = {} if store is None else store
        wide_edits = edits_possible(self)

        @records_only
        def save(x: torch.Tensor, hook: HookPoint) -> None:
            t = x.detach()
            t = t.to(device) if device is not None else t
            # What this hook saw, also when a later hook edits the tensor in place (x.mul_(2)): a
            # view is stored only while no hook of the call (or model-wide one) can edit tensors.
            if t.data_ptr() == x.data_ptr() and (wide_edits or getattr(_SCOPE.get(), "edits", False)):
                t = t.clone()
            store[hook.name] = t

        return store, [(n, save) for n in self._hook_dict if keep(n)]

    def run_with_cache(self, input_ids, *args, names_filter=None, device=None, fwd_hooks=None, **kwargs):
        """Forward once, recording activations. Returns ``(logits, ActivationCache)``.

        ``names_filter``: None (all), a name, a list of names, or a predicate ``str -> bool``.
        ``device``: where the cached tensors are gathered (e.g. "cpu" under offload).

        Hooks the model can compute after the forward (its ``deferred_hooks``, e.g. per-head
        results from a cheaper hook) are, when only the cache listens to them, stored as entries
        computed on first read, so caching every hook costs little more than a forward; a hook of
        the caller's own on such a point gets the eager path.

        Example::

            logits, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
        """
        user_hooks = list(fwd_hooks or ())
        store, cache_hooks = self.cache_hooks(names_filter, device)
        cache_hooks = self._defer(cache_hooks, user_hooks, device, store)
        logits = self.run_with_hooks(input_ids, *args, fwd_hooks=user_hooks + cache_hooks, **kwargs)
        tokens = input_ids.detach().cpu() if isinstance(input_ids, torch.Tensor) else None   # weights_state: for save()
        return logits, ActivationCache(store, self, metadata={"tokens": tokens, "weights_state": weights_state(self)})
