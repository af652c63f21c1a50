"""Reusable, tested hook recipes for ``HookedCommandR`` (see hooks/README.md for one example each).

Every recipe is a small factory returning ``fn(tensor, hook)`` or a list of ``(hook_name, fn)``
ready for ``model.hooks(fwd_hooks=...)``, ``model.run_with_hooks`` or ``model.generate(fwd_hooks=...)``.

Example::

    import hooks
    logits = model.run_with_hooks(ids, fwd_hooks=hooks.ablate_heads([(1, 3)]) + hooks.steer(2, v, coeff=4.0))
"""

from .ablate import (ablate_heads, compute_means, head_axis, mean_ablate, pos_axis, resample_ablate,
                     selection_mask, zero_ablate)
from .attention import knockout, knockout_hooks
from .patch import hook_name, logit_diff, patch_from, patch_heads, patch_mlp, patch_resid, patch_sweep
from .record import Accumulator, accumulate, record, record_hook, run_until, stop_after
from .steer import add_direction, project_out, scale_direction, steer

__all__ = [
    "Accumulator", "ablate_heads", "accumulate", "add_direction", "compute_means", "head_axis", "hook_name",
    "knockout", "knockout_hooks", "logit_diff", "mean_ablate", "patch_from", "patch_heads", "patch_mlp",
    "patch_resid", "patch_sweep", "pos_axis", "project_out", "record", "record_hook", "resample_ablate",
    "run_until", "scale_direction", "selection_mask", "steer", "stop_after", "zero_ablate",
]
