"""Cheap fingerprints of a model's weights and config, to tell saved results of one model from another's.

``weights_fingerprint`` hashes every tensor's name, shape and dtype plus a few fixed slices of its values
(the first and last 64 elements and 16 evenly spaced ones), so it costs microseconds per tensor even for a
104B model, and works on a model dispatched by accelerate with weights offloaded to the CPU or disk (their
parameters sit on the ``meta`` device; the values are read from the offload hook's weights map). It tells
apart different checkpoints, dtypes and quantizations; it is not a cryptographic check of every weight (two
models that differ only outside the sampled slices hash alike).

``config_fingerprint`` hashes the config fields that decide activation shapes and meaning.

Example::

    from workbench.fingerprint import weights_fingerprint, config_fingerprint
    weights_fingerprint(model) == weights_fingerprint(model.state_dict())     # True
    config_fingerprint(model.cfg)                                              # 'c1f3…' (64 hex digits)
"""

from __future__ import annotations

import hashlib
import json
from typing import Mapping, Union

import torch
from torch import nn

from .weights import offloaded_tensor

EDGE = 64          # elements hashed at each end of a flattened tensor
STRIDED = 16       # evenly spaced elements hashed in between


def sample_indices(numel: int) -> torch.Tensor:
    """The fixed flat indices hashed for a tensor of ``numel`` elements (sorted, unique)."""
    if numel <= 2 * EDGE + STRIDED:
        return torch.arange(numel)
    ends = torch.cat([torch.arange(EDGE), torch.arange(numel - EDGE, numel)])
    strided = torch.arange(STRIDED) * (numel // STRIDED) + numel // (2 * STRIDED)
    return torch.unique(torch.cat([ends, strided]))


def _sample_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().reshape(-1)
    picked = flat[sample_indices(flat.numel()).to(flat.device)].to("cpu").contiguous()
    if picked.numel() == 0:
        return b""
    return picked.view(torch.uint8).numpy().tobytes()


def _tensors(model_or_state_dict) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        return model_or_state_dict
    raise TypeError(f"weights_fingerprint: expected an nn.Module or a state dict, got "
                    f"{type(model_or_state_dict).__name__}")


def weights_fingerprint(model_or_state_dict: Union[nn.Module, Mapping[str, torch.Tensor]]) -> str:
    """sha256 (hex) of every tensor's name, shape, dtype and sampled values, in name order.

    Parameters on the ``meta`` device of an accelerate-dispatched model are read from its offload
    weights map; a meta tensor that no offload hook holds (a model built with ``device="meta"``) is
    refused, since its values are unknown.

    >>> weights_fingerprint({"w": torch.zeros(3)})[:12]
    'e0add84f6573'
    """
    model = model_or_state_dict if isinstance(model_or_state_dict, nn.Module) else None
    tensors = _tensors(model_or_state_dict)
    h = hashlib.sha256(b"workbench.weights_fingerprint.v1")
    for name in sorted(tensors):
        t = tensors[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"weights_fingerprint: {name!r} is a {type(t).__name__}, not a tensor")
        if t.device.type == "meta":
            real = offloaded_tensor(model, name) if model is not None else None
            if real is None:
                raise ValueError(f"weights_fingerprint: {name!r} is on the meta device and no offload hook "
                                 "holds its values (a model built on meta has no weights to fingerprint)")
            t = real.to(t.dtype) if real.dtype != t.dtype else real
        header = f"{name}|{tuple(t.shape)}|{str(t.dtype).replace('torch.', '')}|".encode()
        h.update(len(header).to_bytes(4, "little") + header)
        h.update(_sample_bytes(t))
    return h.hexdigest()


def config_fingerprint(cfg) -> str:
    """sha256 (hex) of the config fields that decide activation shapes and meaning (``cfg.fingerprint()``).

    >>> config_fingerprint(CommandRConfig.from_preset("command-r"))[:8]      # doctest: +SKIP
    '5a0d…'
    """
    fields = cfg.fingerprint() if hasattr(cfg, "fingerprint") else dict(cfg)
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(b"workbench.config_fingerprint.v1|" + text.encode()).hexdigest()


def weights_state(model: nn.Module) -> tuple:
    """A token that changes when any parameter is edited in place or replaced: ``(data_ptr, _version)``
    per parameter (microseconds). ``run_with_cache`` keeps it, so ``ActivationCache.save`` can tell that
    the weights it fingerprints are still the ones the forward ran with.

    >>> weights_state(model) == weights_state(model)                     # doctest: +SKIP
    True
    """
    return tuple((p.data_ptr(), p._version) for p in model.parameters())

