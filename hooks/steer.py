"""Steering recipes: add, scale or project out a direction on any ``[... d_model]`` hook.

Position- and step-aware during cached generation, through ``hook.ctx``:

* ``where="all"``: every forward; ``"prompt"``: only outside generation or in its prefill
  (``hook.ctx.step`` None or 0); ``"new"``: only decode steps (``step`` not None and >= 1);
* ``positions=``: absolute positions (``hook.ctx.positions``), e.g. only the prompt's last token.

Example::

    from hooks import steer, add_direction

    fwd = steer(layers=[2, 3], direction=v, coeff=4.0, where="new")     # resid_pre of layers 2, 3
    model.generate(ids, max_new_tokens=20, fwd_hooks=fwd)
    fwd = steer(layers=2, direction=v, mode="project")                  # remove v's component
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from workbench.hook_names import act_name

from .ablate import Index, to_index, query_positions

_WHERE = ("all", "prompt", "new")


def _check(direction: torch.Tensor, where: str) -> torch.Tensor:
    direction = torch.as_tensor(direction)
    if not direction.is_floating_point() or direction.dim() < 1:
        raise ValueError(f"direction: expected a float tensor [... d_model], got {direction!r:.80}")
    if where not in _WHERE:
        raise ValueError(f"where: expected one of {_WHERE}, got {where!r}")
    return direction


def active(x: torch.Tensor, hook, where: str = "all", positions: Index = None):
    """False (do nothing), True (everywhere) or a bool mask ``[batch|1 pos 1 ...]`` over ``x``."""
    step = hook.ctx.step
    if where == "new" and (step is None or step < 1):
        return False
    if where == "prompt" and not (step is None or step == 0):
        return False
    if positions is None:
        return True
    if x.dim() < 3:
        raise ValueError(f"{hook.name}: positions= needs a [batch pos ... d_model] activation, got {tuple(x.shape)}")
    pm = torch.isin(query_positions(hook, x.shape[1], x.device), to_index(positions, "positions").to(x.device))
    return pm.reshape(pm.shape + (1,) * (x.dim() - 2))


def _fit(direction: torch.Tensor, x: torch.Tensor, hook) -> None:
    if direction.shape[-1] != x.shape[-1]:
        raise ValueError(f"{hook.name}: direction has last axis {direction.shape[-1]}, the activation "
                         f"{tuple(x.shape)} has {x.shape[-1]} (steer [... d_model] hooks)")


def add_direction(direction: torch.Tensor, coeff: float = 1.0, where: str = "all", positions: Index = None):
    """``fn(x, hook)`` returning ``x + coeff * direction`` (in the activation's dtype) where active.

    Example::

        model.run_with_hooks(ids, fwd_hooks=[("blocks.2.hook_resid_pre", add_direction(v, 8.0))])
    """
    direction = _check(direction, where)

    def fn(x: torch.Tensor, hook) -> Optional[torch.Tensor]:
        _fit(direction, x, hook)
        sel = active(x, hook, where, positions)
        if sel is False:
            return None
        out = x + (coeff * direction).to(x.device, x.dtype)
        return out if sel is True else torch.where(sel, out, x)

    return fn


def scale_direction(direction: torch.Tensor, factor: float, where: str = "all", positions: Index = None):
    """``fn(x, hook)`` multiplying the component of ``x`` along ``direction`` by ``factor`` (fp32 math).

    ``factor=0`` projects the direction out; ``factor=-1`` reflects it.

    Example::

        fwd = [("blocks.1.hook_resid_post", scale_direction(v, 0.0))]     # ablate the v feature
    """
    direction = _check(direction, where)
    norm = direction.float().norm(dim=-1, keepdim=True)
    if (norm == 0).any():
        raise ValueError("direction: has zero norm, so it defines no direction to scale")
    unit = direction.float() / norm

    def fn(x: torch.Tensor, hook) -> Optional[torch.Tensor]:
        _fit(direction, x, hook)
        sel = active(x, hook, where, positions)
        if sel is False:
            return None
        u = unit.to(x.device)
        xf = x.float()
        along = (xf * u).sum(-1, keepdim=True) * u                     # component along u
        out = (xf + (factor - 1.0) * along).to(x.dtype)
        return out if sel is True else torch.where(sel, out, x)

    return fn


def project_out(direction: torch.Tensor, where: str = "all", positions: Index = None):
    """``fn(x, hook)`` removing the component of ``x`` along ``direction``.

    Example::

        fwd = [("blocks.1.hook_resid_pre", project_out(v))]
    """
    return scale_direction(direction, 0.0, where, positions)


def steer(layers: Union[int, list], direction: torch.Tensor, coeff: float = 1.0, mode: str = "add",
          factor: float = 0.0, hook: str = "resid_pre", where: str = "all", positions: Index = None) -> list:
    """``[(name, fn)]`` steering ``hook`` (``resid_pre``, ``resid_post``, ``attn_out``, ``mlp_out``) of ``layers``.

    ``mode``: "add" (``coeff * direction``), "scale" (component × ``factor``) or "project" (remove it).

    Example::

        model.generate(ids, max_new_tokens=20, fwd_hooks=steer(3, v, coeff=6.0, where="new"))
    """
    if hook not in ("resid_pre", "resid_post", "attn_out", "mlp_out"):
        raise ValueError(f"hook: expected resid_pre, resid_post, attn_out or mlp_out, got {hook!r} "
                         "(for another [... d_model] hook, use add_direction/scale_direction directly)")
    if mode == "add":
        fn = add_direction(direction, coeff, where, positions)
    elif mode == "scale":
        fn = scale_direction(direction, factor, where, positions)
    elif mode == "project":
        fn = project_out(direction, where, positions)
    else:
        raise ValueError(f"mode: expected 'add', 'scale' or 'project', got {mode!r}")
    layers = [layers] if isinstance(layers, int) else list(layers)
    return [(act_name(hook, layer), fn) for layer in layers]
