"""SAEs spliced into HookedCommandR at any hook point, with SAELens' method names (a model mixin).

``model.add_sae(sae)`` runs the SAE on the activation at ``sae.cfg.hook_name`` and passes its
output on; the SAE's own hook points join the model's under that name, so
``blocks.2.hook_resid_post.hook_sae_acts_post`` (and ``hook_sae_input``, ``hook_sae_acts_pre``,
``hook_sae_recons``, ``hook_sae_error``, ``hook_sae_output``) can be hooked and cached like any other.
Hooks on the original name run in the order they were added relative to the SAE.

``use_error_term=True`` adds back what the SAE misses, so the model's output is unchanged (bit for
bit) unless a hook edits the features; without it the model runs on the reconstruction.

Example::

    sae = SAE.load_from_disk("command-r-tiny-res-l2")
    logits = model.run_with_saes(tokens, saes=[sae])                        # reconstruction spliced in
    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True)
    cache["blocks.2.hook_resid_post.hook_sae_acts_post"].shape               # [batch pos d_sae]
    with model.saes(saes=[sae]):
        loss = model(tokens, return_type="loss")
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

from .sae import HOOK_NAMES, SAE
from .hook_names import get_act_name


class SAEHostMixin:
    """``add_sae``, ``reset_saes``, ``saes()``, ``run_with_saes``, ``run_with_cache_with_saes``,
    ``run_with_hooks_with_saes`` and ``acts_to_saes`` (hook name -> attached SAE)."""

    @property
    def acts_to_saes(self) -> dict:
        return {name: entry[0] for name, entry in self.__dict__.setdefault("_sae_entries", {}).items()}

    def _sae_point_name(self, sae: SAE) -> str:
        if not isinstance(sae, SAE):
            raise TypeError(f"expected a workbench.sae.SAE, got {type(sae).__name__}")
        name = sae.cfg.hook_name
        if name not in self.hook_dict:
            try:
                alias = get_act_name(name)
            except KeyError as e:
                raise ValueError(f"SAE hook_name {name!r}: {e}") from None
            if alias not in self.hook_dict:
                self._resolve(name)               # raises with the closest names
            name = alias
        return name

    def add_sae(self, sae: SAE, use_error_term: Optional[bool] = None) -> None:
        """Splice ``sae`` in at its hook point (replacing an SAE already there) until ``reset_saes``."""
        name = self._sae_point_name(sae)
        if name in self.acts_to_saes:
            self.reset_saes([name])
        point = self.hook_dict[name]
        entries = self.__dict__["_sae_entries"]
        saved = sae.use_error_term
        if use_error_term is not None:
            sae.use_error_term = use_error_term

        def run_sae(x, hook):
            return sae(x)

        entries[name] = [sae, saved, run_sae, point.add_hook(run_sae)]
        for hook_name in HOOK_NAMES:
            point.add_module(hook_name, getattr(sae, hook_name))
        self.setup_hooks()

    def reset_saes(self, act_names: Optional[Sequence[str]] = None) -> None:
        """Detach the SAEs at ``act_names`` (default: all), restoring each SAE's ``use_error_term``."""
        entries = self.__dict__.setdefault("_sae_entries", {})
        names = list(entries) if act_names is None else [act_names] if isinstance(act_names, str) else list(act_names)
        for name in names:
            if name not in entries:
                raise KeyError(f"reset_saes: no SAE attached at {name!r}; attached: {sorted(entries)}")
            sae, use_error_term, _, remove = entries.pop(name)
            remove()
            sae.use_error_term = use_error_term
            point = self.get_submodule(name)
            for hook_name in HOOK_NAMES:
                delattr(point, hook_name)
        self.setup_hooks()

    def reset_hooks(self, *args, **kwargs) -> None:
        """Remove hooks; attached SAEs stay spliced in (``reset_saes`` detaches them)."""
        super().reset_hooks(*args, **kwargs)
        for name, entry in self.__dict__.setdefault("_sae_entries", {}).items():
            entry[3] = self.hook_dict[name].add_hook(entry[2])

    @contextlib.contextmanager
    def saes(self, saes: Sequence[SAE] = (), reset_saes_end: bool = True, use_error_term: Optional[bool] = None):
        """Attach ``saes`` for the duration of the block (detached again even on an exception)."""
        saes = [saes] if isinstance(saes, SAE) else list(saes)
        before = set(self.acts_to_saes)
        try:
            for sae in saes:
                self.add_sae(sae, use_error_term=use_error_term)
            yield self
        finally:
            if reset_saes_end:
                added = [n for n, sae in self.acts_to_saes.items() if n not in before or any(sae is s for s in saes)]
                if added:
                    self.reset_saes(added)

    def run_with_saes(self, *model_args, saes: Sequence[SAE] = (), reset_saes_end: bool = True,
                      use_error_term: Optional[bool] = None, **model_kwargs):
        """The forward with ``saes`` spliced in (SAELens' ``HookedSAETransformer.run_with_saes``)."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args, saes: Sequence[SAE] = (), reset_saes_end: bool = True,
                                 use_error_term: Optional[bool] = None, **kwargs):
        """``run_with_cache`` with ``saes`` spliced in; the SAEs' activations are in the cache."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self.run_with_cache(*model_args, **kwargs)

    def run_with_hooks_with_saes(self, *model_args, saes: Sequence[SAE] = (), reset_saes_end: bool = True,
                                 fwd_hooks=None, bwd_hooks=None, use_error_term: Optional[bool] = None, **kwargs):
        """``run_with_hooks`` with ``saes`` spliced in (hooks may target the SAE's hook points)."""
        with self.saes(saes, reset_saes_end, use_error_term):
            return self.run_with_hooks(*model_args, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, **kwargs)
