"""The activation-cache file format: one safetensors file with the hook names (in order), the
model's config fingerprint, its weights fingerprint (``workbench.fingerprint.weights_fingerprint``),
``n_layers`` and the prompt tokens as metadata.

``ActivationCache.save``/``ActivationCache.load`` call these; a file is refused (``CacheMismatchError``)
when it is not a cache file, was saved from a model with another config or other weights, or holds a
tensor whose shape or dtype does not fit the model's hook table.

Example::

    write_cache_file("run.safetensors", {"hook_embed": x}, fingerprint=cfg.fingerprint(), n_layers=4)
    tensors, metadata = read_cache_file("run.safetensors", expected_fingerprint=cfg.fingerprint())
"""

from __future__ import annotations

import json
import os
import warnings
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FILE_FORMAT = "workbench.activation_cache"
FILE_FORMAT_VERSION = "1"


class CacheMismatchError(ValueError):
    """A saved cache does not belong to the model it is being loaded for (or is not a cache file)."""


def write_cache_file(path, tensors: dict, fingerprint: Optional[dict] = None, n_layers: Optional[int] = None,
                     tokens=None, weights_fingerprint: Optional[str] = None) -> None:
    """Write ``tensors`` (hook name -> tensor, in order) with the metadata that ``read_cache_file`` checks."""
    out, storages = {}, set()
    for name, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"cannot save {name!r}: it is on the meta device")
        t = t.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        # resid_post[l] and resid_pre[l+1] are one tensor; safetensors refuses shared storage
        if storage.data_ptr() in storages or storage.nbytes() != t.numel() * t.element_size():
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    meta = {"format": FILE_FORMAT, "format_version": FILE_FORMAT_VERSION, "hook_names": json.dumps(list(tensors))}
    if fingerprint is not None:
        meta["fingerprint"] = json.dumps(fingerprint)
    if n_layers is not None:
        meta["n_layers"] = str(n_layers)
    if weights_fingerprint is not None:
        meta["weights_fingerprint"] = weights_fingerprint
    if tokens is not None:
        meta["tokens"] = json.dumps(torch.as_tensor(tokens).tolist())
    save_file(out, os.fspath(path), metadata=meta)


def read_cache_file(path, expected_fingerprint: Optional[dict] = None, strict: bool = True,
                    device=None) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of a file written by ``write_cache_file``, checked against
    ``expected_fingerprint`` when given (see ``ActivationCache.load``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"activation cache file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FILE_FORMAT:
                raise CacheMismatchError(f"{path}: not an ActivationCache file (metadata format="
                                         f"{meta.get('format')!r}, expected {FILE_FORMAT!r})")
            names = json.loads(meta["hook_names"])
            if set(names) != set(f.keys()):
                raise CacheMismatchError(f"{path}: hook_names metadata does not match the stored tensors")
            fingerprint = json.loads(meta["fingerprint"]) if "fingerprint" in meta else None
            if expected_fingerprint is not None:
                check_fingerprint(path, fingerprint, expected_fingerprint, strict)
            tensors = {n: f.get_tensor(n) for n in names}
    except CacheMismatchError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise CacheMismatchError(f"{path}: cannot read as an ActivationCache file ({e})") from e
    if device is not None:
        tensors = {n: t.to(device) for n, t in tensors.items()}
    metadata = {"fingerprint": fingerprint, "path": path, "weights_fingerprint": meta.get("weights_fingerprint")}
    if "tokens" in meta:
        metadata["tokens"] = torch.tensor(json.loads(meta["tokens"]), dtype=torch.long)
    if "n_layers" in meta:
        metadata["n_layers"] = int(meta["n_layers"])
    return tensors, metadata


def check_fingerprint(path: str, saved: Optional[dict], current: dict, strict: bool) -> None:
    """Refuse a file saved from another config (every differing field named)."""
    if saved is None:
        if strict:
            raise CacheMismatchError(f"{path}: has no model config fingerprint, so it cannot be checked "
                                     "against this model; pass strict=False to load it anyway")
        return
    current = json.loads(json.dumps(current))  # same JSON normalisation as the saved side
    diffs = [f"{k} (cache {saved.get(k)!r}, model {current.get(k)!r})"
             for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diffs:
        raise CacheMismatchError(f"{path}: saved from a model with a different config: {'; '.join(diffs)}. "
                                 "Load it with the model it came from, or with model=None to inspect it")


def check_weights(path: str, saved: Optional[str], current: str, allow_other_weights: bool,
                  strict: bool = True) -> None:
    """Refuse a file saved from other weights (a fine-tune, another seed, another dtype), unless
    ``allow_other_weights`` (then warn); ``strict=False`` lets a file without a fingerprint pass (warned)."""
    if saved == current:
        return
    if saved is None and not strict:
        allow_other_weights = True
    what = ("has no weights fingerprint (saved before caches recorded one, or after the weights were edited)"
            if saved is None else f"was saved from other weights (fingerprint {saved[:12]}…, this model's "
            f"{current[:12]}…): a fine-tune, another seed, dtype or quantization of the same architecture")
    if not allow_other_weights:
        raise CacheMismatchError(f"{path}: {what}. Its activations would be analysed with this model's weights; "
                                 "load it with the model it came from, with model=None to inspect it, or pass "
                                 "allow_other_weights=True if you mean to mix them")
    warnings.warn(f"{path}: {what}; loaded anyway (allow_other_weights=True)", UserWarning, stacklevel=3)


# axes whose size depends on the input (checked for consistency only where it is safe to)
_INPUT_AXES = ("batch", "pos", "q_pos", "k_pos")


def check_hook_shapes(path: str, tensors: dict, rows: list) -> None:
    """Every tensor must be a hook of the model (``rows``: its hook table) with the table's rank, dtype
    and model dimensions (d_model, head, d_head, ...); the batch size must agree across tensors."""
    table = {r["name"]: r for r in rows}
    batch = None
    for name, t in tensors.items():
        base = name[:-len("_grad")] if name.endswith("_grad") else name      # TL's incl_bwd gradients
        row = table.get(base)
        if row is None:
            raise CacheMismatchError(f"{path}: {name!r} is not a hook of this model")
        axes, want_shape = row["axes"].split(), row["shape"]
        if t.dim() == len(axes) - 1 and axes[0] == "batch":                   # TL's remove_batch_dim
            axes, want_shape = axes[1:], want_shape[1:]
        if t.dim() != len(axes) or t.dtype != row["dtype"]:
            raise CacheMismatchError(f"{path}: {name!r} is {tuple(t.shape)} {t.dtype}; this model's hook is "
                                     f"[{row['axes']}] {row['dtype']}")
        for axis, got, want in zip(axes, t.shape, want_shape):
            if axis == "batch":
                batch = got if batch is None else batch
                if got != batch:
                    raise CacheMismatchError(f"{path}: {name!r} has batch {got}, other entries {batch}")
            elif axis not in _INPUT_AXES and got != want:
                raise CacheMismatchError(f"{path}: {name!r} has {axis}={got}; this model's is {want} "
                                         f"(shape {tuple(t.shape)}, axes [{row['axes']}])")

