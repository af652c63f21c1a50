"""Cohere's LayerNorm as a function (used by the model's norms and by analyses that re-apply them).

Example::

    y = layer_norm_fp32(x, weight, eps=1e-5)     # x [batch pos d_model] -> same shape, x's dtype
"""

from __future__ import annotations

import torch


def layer_norm_fp32(x: torch.Tensor, weight: torch.Tensor, eps: float, scale_hook=None) -> torch.Tensor:
    """Cohere's LayerNorm with exactly the reference's ops: mean-subtracted (not RMSNorm), no bias,
    fp32 throughout including the weight multiply, cast back to ``x``'s dtype at the end.

    ``scale_hook`` (a HookPoint) sees the divisor ``sqrt(var + eps)`` [batch pos 1] float32 when it is
    listened to; a hook may replace or edit it, and a backward hook on it gets the divisor's gradient."""
    dtype = x.dtype
    x = x.to(torch.float32)
    mean = x.mean(-1, keepdim=True)
    centred = x - mean
    var = centred.pow(2).mean(-1, keepdim=True)
    inv = torch.rsqrt(var + eps)
    if scale_hook is not None and scale_hook.has_hooks:
        scale = torch.sqrt(var + eps)                      # [batch pos 1], float32
        before = scale.detach().clone()                    # detects in-place edits by a hook
        hooked = scale_hook(scale)
        if hooked is not scale or not torch.equal(scale.detach(), before):
            inv = hooked.reciprocal()                      # replaced (e.g. frozen) or edited divisor
        elif scale_hook.has_bwd_hooks and torch.is_grad_enabled() and scale.requires_grad:
            r = scale.reciprocal()
            inv = inv.detach() + (r - r.detach())          # same value bit for bit; gradient via hook_scale
    y = centred * inv
    y = weight.to(torch.float32) * y
    return y.to(dtype)
