"""An explicit ``device_map`` dict checked, and made disjoint, before any weight is placed or written to an
offload folder.

accelerate accepts only maps whose keys do not overlap: with ``{"": "cpu", "blocks.1": "disk"}`` its
dispatch fails deep inside (``weight is on the meta device``) after the disk weights were already
written. Here such a map is checked (string keys naming modules) and its outer keys are split into
their parts, so the more specific key wins as everywhere else in the loader: the example becomes
``{"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "cpu", ..., "unembed": "cpu"}``.

Example::

    device_map = disjoint_device_map({"": "cpu", "blocks.1": "disk"}, model)
"""

from __future__ import annotations

from torch import nn

__all__ = ["check_module_names", "disjoint_device_map"]


def check_module_names(device_map: dict, modules: dict) -> None:
    """Refuse ``device_map`` keys that name no module of the model (``modules``: ``dict(named_modules())``)."""
    unknown = [k for k in device_map if k not in modules]
    if unknown:
        raise ValueError(f"device_map: unknown module name(s) {unknown}; use names like 'embed', 'blocks.0', "
                         "'blocks.0.attn', 'ln_final', 'unembed' (or '' for the whole model)")


def disjoint_device_map(device_map, model: nn.Module):
    """For a dict ``device_map``: refuse non-string or unknown keys, then replace every key that has
    another key inside it by its children (those holding parameters), keeping the most specific
    entry for each module. Anything else (a strategy name, a device) is returned unchanged.

    Example::

        disjoint_device_map({"": 0, "blocks.3": "cpu"}, model)["blocks.2"]       # 0
    """
    if not isinstance(device_map, dict):
        return device_map
    bad = [k for k in device_map if not isinstance(k, str)]
    if bad:
        raise ValueError(f"device_map: keys must be module names (str), got {bad}")
    modules = dict(model.named_modules())
    check_module_names(device_map, modules)
    out = dict(device_map)
    while True:
        outer = next((o for o in sorted(out, key=len)
                      if any(k != o and (o == "" or k.startswith(o + ".")) for k in out)), None)
        if outer is None:
            break
        module = modules[outer]
        own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
        if own:
            raise ValueError(f"device_map: {outer!r} holds tensors of its own ({own}) and also has entries inside "
                             "it; give its tensors and its parts one entry each")
        value = out.pop(outer)
        prefix = f"{outer}." if outer else ""
        for child_name, child in module.named_children():
            if any(True for _ in child.parameters()) or any(True for _ in child.buffers()):
                out.setdefault(prefix + child_name, value)
    order = {name: i for i, name in enumerate(modules)}
    return {k: out[k] for k in sorted(out, key=order.__getitem__)}
