"""Placing a loaded model over GPUs, CPU and disk with accelerate (device_map / dispatch / offload).

The unit that is never split is a ``Block`` (its parallel attention + MLP share one LayerNorm
output). An offloaded block is loaded *whole* at the start of its forward
(``preload_module_classes=["Block"]``): code inside the block that reads weights directly, such as
``hook_result`` reading ``attn.W_O``, then sees real tensors rather than empty meta ones.

Disk offload never needs the whole model in memory: "disk" weights are either referenced in the
checkpoint's own safetensors shards (no copy; cast on the fly if the dtype differs) or, when an
``offload_folder`` is given, written once in the target dtype, one tensor at a time, to a subfolder
named after the checkpoint and dtype (``checkpoint_key``): models of other weights sharing a folder
never overwrite each other's files.

Example::

    model = HookedCommandR.from_pretrained(path, device_map="auto",
                                           max_memory={0: "70GiB", 1: "70GiB", "cpu": "100GiB"},
                                           offload_folder="/scratch/offload")
    model.hf_device_map      # {"embed": 0, "blocks.0": 0, ..., "blocks.39": 1, "ln_final": 1, ...}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from typing import Optional

import torch
from torch import nn

from .config import dtype_name
from .device_map_checks import check_module_names
from .safetensors_files import read_header, read_tensor, save_aligned
from .weights import Device, accelerate_hooks, torch_device

__all__ = ["NO_SPLIT", "STRATEGIES", "Offloader", "checkpoint_key", "device_for", "dispatch", "execution_device", "resolve_device_map",
           "save_aligned", "torch_device"]

NO_SPLIT = ["Block"]
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _normalise_value(key: str, value) -> Device:
    if value == "disk" or isinstance(value, int):
        return value
    try:
        torch_device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"device_map[{key!r}]: {value!r} is not a device; expected e.g. 0, 'cuda:1', "
                         "'cpu' or 'disk'") from None
    return str(value) if isinstance(value, torch.device) else value


def resolve_device_map(model: nn.Module, device_map, max_memory, dtype: torch.dtype,
                       device=None) -> dict[str, Device]:
    """A complete {module name: device} for ``model`` (on meta): explicit, inferred or one device."""
    if device_map is None:
        if max_memory is not None:
            raise ValueError("max_memory is only used together with device_map (e.g. device_map='auto')")
        return {"": _normalise_value("", device if device is not None else "cpu")}
    if isinstance(device_map, (int, torch.device)) or (isinstance(device_map, str) and device_map not in STRATEGIES):
        return {"": _normalise_value("", device_map)}
    if isinstance(device_map, str):
        from accelerate import infer_auto_device_map
        from accelerate.utils import get_balanced_memory, get_max_memory

        # accelerate matches tied names by substring ("embed." is inside "unembed.") and then fails to
        # find the tied module; plan with an untied unembedding instead (counted separately, so the
        # plan is conservative) and re-tie after loading where both land on the same device.
        tied = model.unembed.weight is model.embed.weight
        if tied:
            model.unembed.weight = nn.Parameter(torch.empty_like(model.embed.weight, device="meta"))
        try:
            max_memory = get_max_memory(max_memory)
            if device_map != "sequential":
                max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT,
                                                 dtype=dtype, low_zero=device_map == "balanced_low_0")
            return dict(infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=NO_SPLIT,
                                              dtype=dtype))
        finally:
            if tied:
                model.unembed.weight = model.embed.weight
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map: expected one of {STRATEGIES}, a device or a dict, got {device_map!r}")
    check_module_names(device_map, dict(model.named_modules()))
    resolved = {k: _normalise_value(k, v) for k, v in device_map.items()}
    uncovered = [n for n, _ in model.named_parameters(remove_duplicate=False) if device_for(resolved, n) is None]
    if uncovered:
        raise ValueError(f"device_map: no device for parameter(s) {uncovered[:8]}"
                         f"{' ...' if len(uncovered) > 8 else ''}; every module needs an entry")
    return resolved


def device_for(device_map: dict, name: str) -> Optional[Device]:
    """The device of the longest device_map key that is a prefix (module path) of ``name``."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return device_map[key]
    return None


class Offloader:
    """Collects the offload index of "disk" weights (accelerate's ``offload_index`` format).

    With an ``offload_folder``, the weights go to a subfolder named after what they are: the
    checkpoint's resolved path, each of its weight files' size and mtime, and the target dtype
    (``checkpoint_key``). Loading other weights into the same folder therefore never rewrites files
    that a model loaded earlier still reads at every forward (accelerate reopens them by path), and
    loading the same checkpoint again reuses the files already there. A file is written under a
    temporary name and renamed into place, so a reader never sees half of one.
    """

    def __init__(self, checkpoint: str, folder: Optional[str], dtype: torch.dtype) -> None:
        self.checkpoint, self.dtype = checkpoint, dtype
        self.folder = None if folder is None else os.path.join(os.path.abspath(folder), checkpoint_key(checkpoint, dtype))
        self.index: dict[str, dict] = {}
        self._written: dict[tuple, str] = {}
        if self.folder is not None:
            os.makedirs(self.folder, exist_ok=True)

    def add(self, name: str, entry) -> None:
        """Record where ``name`` (our parameter name) is read from during the forward."""
        if self.folder is None:
            info = {"safetensors_file": entry.file, "weight_name": entry.name}
            if entry.dtype != self.dtype:
                info["dtype"] = dtype_name(self.dtype)
            self.index[name] = info
            return
        key = (entry.file, entry.name)
        if key not in self._written:                  # a tied embedding is written once
            file = os.path.join(self.folder, f"{name}.safetensors")
            if not _holds(file, name, entry.shape, self.dtype):      # else written by an earlier load
                tmp = f"{file}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
                try:
                    save_aligned(name, read_tensor(entry, self.dtype), tmp)
                    os.replace(tmp, file)
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
            self._written[key] = (file, name)
        file, weight_name = self._written[key]
        self.index[name] = {"safetensors_file": file, "weight_name": weight_name}

    def finish(self) -> None:
        if self.folder is not None:
            tmp = os.path.join(self.folder, f"index.json.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.index, f, indent=2)
            os.replace(tmp, os.path.join(self.folder, "index.json"))


def checkpoint_key(checkpoint: str, dtype: torch.dtype) -> str:
    """A name for the offloaded copy of ``checkpoint`` in ``dtype``: the folder name, then 16 hex digits
    of a hash of its resolved path, its weight files' names, sizes and mtimes, and the dtype."""
    root = os.path.realpath(checkpoint)
    files = sorted(f for f in os.listdir(root) if f.endswith(".safetensors")) if os.path.isdir(root) else []
    parts = [root, dtype_name(dtype)]
    for f in files:
        st = os.stat(os.path.join(root, f))
        parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    digest = hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(root))[:40] or "checkpoint"
    return f"{base}-{dtype_name(dtype)}-{digest}"


def _holds(file: str, name: str, shape, dtype: torch.dtype) -> bool:
    """True when ``file`` is a complete offload file of tensor ``name`` with this shape and dtype."""
    if not os.path.isfile(file):
        return False
    try:
        entries = read_header(file)
    except Exception:  # noqa: BLE001 - unreadable: write it again
        return False
    entry = entries.get(name)
    return (entry is not None and tuple(entry.shape) == tuple(shape) and entry.dtype == dtype
            and os.path.getsize(file) >= entry.start + entry.nbytes)


def dispatch(model: nn.Module, device_map: dict, offloader: Optional[Offloader], offload_buffers: bool = False):
    """Attach accelerate's hooks when the map spans several devices or the disk; else nothing to do."""
    model.hf_device_map = dict(device_map)
    if len(set(map(str, device_map.values()))) == 1 and "disk" not in device_map.values():
        return model
    from accelerate import dispatch_model

    index = offloader.index if offloader is not None else None
    return dispatch_model(model, device_map, offload_dir=offloader.folder if offloader else None,
                          offload_index=index or None, offload_buffers=offload_buffers,
                          preload_module_classes=NO_SPLIT)


def execution_device(model: nn.Module) -> torch.device:
    """Where inputs should be: the device accelerate runs the embedding on (or its weight's device)."""
    for hook in accelerate_hooks(model.embed) + accelerate_hooks(model):
        dev = getattr(hook, "execution_device", None)
        if dev is not None:
            return torch_device(dev)
    return model.embed.weight.device
