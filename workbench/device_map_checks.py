"""An explicit ``device_map`` dict checked before any weight is placed or written to an offload folder.

accelerate accepts only maps whose keys do not overlap: with ``{"": "cpu", "blocks.1": "disk"}`` its
dispatch fails deep inside (``weight is on the meta device``) after the disk weights were already
written. These checks refuse such a map up front, naming the keys.

Example::

    check_device_map({"": "cpu", "blocks.1": "disk"}, model)
    # ValueError: device_map: keys '' and 'blocks.1' overlap ...
"""

from __future__ import annotations

from torch import nn

__all__ = ["check_device_map"]


def check_device_map(device_map, model: nn.Module) -> None:
    """For a dict ``device_map``: string keys naming modules of ``model``, none inside another.

    Example::

        check_device_map({"embed": "cpu", "blocks": 0, "ln_final": 0, "unembed": 0}, model)   # fine
    """
    if not isinstance(device_map, dict):
        return
    bad = [k for k in device_map if not isinstance(k, str)]
    if bad:
        raise ValueError(f"device_map: keys must be module names (str), got {bad}")
    modules = dict(model.named_modules())
    unknown = [k for k in device_map if k not in modules]
    if unknown:
        raise ValueError(f"device_map: unknown module name(s) {unknown}; use names like 'embed', 'blocks.0', "
                         "'blocks.0.attn', 'ln_final', 'unembed' (or '' alone for the whole model)")
    keys = sorted(device_map)
    for outer in keys:
        inner = next((k for k in keys if k != outer and (outer == "" or k.startswith(outer + "."))), None)
        if inner is not None:
            children = [n for n, _ in modules[outer].named_children()]
            prefix = f"{outer}." if outer else ""
            raise ValueError(
                f"device_map: keys {outer!r} ({device_map[outer]!r}) and {inner!r} ({device_map[inner]!r}) overlap: "
                f"{inner!r} is inside {outer!r}; give every module exactly one entry, e.g. replace {outer!r} by "
                f"its parts {[prefix + c for c in children][:8]}")
