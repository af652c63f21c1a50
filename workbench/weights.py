"""Reading weights wherever they are: on a device, held by an accelerate offload hook, or packed by
bitsandbytes. Nothing here knows the model's layout beyond parameter names.

Example::

    w = model_weight(model, "blocks.0.attn.o_proj.weight")   # real values, also under disk offload
    dense = dense_weight(model.blocks[0].attn.o_proj)        # [out in], dequantized if 4-/8-bit
"""

from __future__ import annotations

import copy
from typing import Optional, Union

import torch
from einops import rearrange
from torch import nn

Device = Union[int, str, torch.device]


def torch_device(value: Device) -> torch.device:
    """0 -> cuda:0, "cpu" -> cpu (accelerate's device_map values; "disk" is not a torch device)."""
    if isinstance(value, int):
        return torch.device("cuda", value)
    return torch.device(value)


def accelerate_hooks(module: nn.Module) -> list:
    """The accelerate hooks attached to ``module`` (``module._hf_hook``, unpacked if sequential)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def offloaded_tensor(model: nn.Module, name: str) -> Optional[torch.Tensor]:
    """The value of parameter ``name`` held in an accelerate hook's ``weights_map`` (None if none has it).

    With ``cpu_offload``/``disk_offload``/``device_map`` offload, accelerate keeps offloaded weights on
    the meta device outside forward and stores their values in the ``weights_map`` of an
    ``AlignDevicesHook`` attached to the module or one of its parents; look there, owner first."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:cut]))
        for hook in accelerate_hooks(module):
            weights_map = getattr(hook, "weights_map", None)
            if weights_map is None:
                continue
            try:
                return weights_map[".".join(parts[cut:])]
            except KeyError:
                continue
    return None


def model_weight(model: nn.Module, name: str) -> torch.Tensor:
    """The value of parameter ``name`` (e.g. ``"ln_final.weight"``), also under accelerate offload.

    Raises a clear error when the value cannot be found.

    Example::

        w = model_weight(model, "blocks.0.attn.o_proj.weight")      # [d_model, head*d_head]
    """
    param = model.get_parameter(name)
    if param.device.type != "meta":
        return param
    value = offloaded_tensor(model, name)
    if value is None:
        raise RuntimeError(
            f"parameter {name!r} is on the meta device and no accelerate offload weights_map holds it; "
            "load real weights (or read activations, which are always real) before this analysis")
    return value


def require_bitsandbytes():
    """The bitsandbytes module (an optional extra), or an ImportError saying how to install it."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise ImportError("quantization_config needs bitsandbytes: pip install 'bitsandbytes>=0.45' "
                          "(or commandr-workbench[quantization])") from e
    return bnb


def dense_weight(linear: nn.Module) -> torch.Tensor:
    """The [out in] weight of a Linear, dequantized if it is a bitsandbytes 4-bit/8-bit layer.

    Example::

        W = dense_weight(model.blocks[0].mlp.down_proj)      # [d_model d_mlp]
    """
    w = linear.weight
    state = getattr(w, "quant_state", None)
    if state is not None:                                   # Params4bit
        bnb = require_bitsandbytes()
        data = w.data
        if getattr(state, "packing_format_for_cpu", False):  # repacked for the AVX512-BF16 kernel
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            packed_absmax = state.absmax                      # [K/blocksize, N] bf16 in this format
            data, state = _convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
            if not state.nested:  # bnb's inverse restores the absmax layout only for nested stats
                state.absmax = packed_absmax.T.reshape(-1).float()
        return bnb.functional.dequantize_4bit(data, state)
    scb = getattr(w, "SCB", None)
    if w.dtype == torch.int8 and scb is not None:           # Int8Params: row-wise absmax scaling
        return w.data.float() * (scb.float()[:, None] / 127.0)
    return w


def heads_of_o_proj(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """o_proj's [d_model (head d_head)] weight as [head d_head d_model]: head j writes z_j @ W_O[j]."""
    return rearrange(weight, "m (h d) -> h d m", h=n_heads)


def per_head_result(z: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each head's output ``[batch pos head d_model]`` from ``z`` [batch pos head d_head] and o_proj's
    weight [d_model (head d_head)]: the einsum the model runs when ``hook_result`` is listened to."""
    return torch.einsum("bshd,hdm->bshm", z, heads_of_o_proj(weight, z.shape[2]))
