"""Writing a model in the Hugging Face layout: config.json, generation_config.json, safetensors shards.

Example::

    model.save_pretrained("/tmp/copy", max_shard_size="2GB")
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors.torch import save_file

from .config import dtype_name
from .loading import INDEX_FILE, SINGLE_FILE, ours_to_hf, parse_size
from .quantization import is_quantized
from .weights import offloaded_tensor


def _gather(model) -> dict[str, torch.Tensor]:
    """HF name -> CPU tensor for every weight, fetching offloaded (meta) ones from their store."""
    if is_quantized(model):
        raise ValueError("save_pretrained: this model was loaded with quantization_config; saving bitsandbytes "
                         "weights is not supported - load it without quantization to save it")
    state = {}
    tied = model.cfg.tie_word_embeddings
    for name, p in model.state_dict(keep_vars=True).items():
        if name == "unembed.weight" and tied:
            continue
        t = offloaded_tensor(model, name) if p.is_meta else p.detach()
        if t is None or t.is_meta:
            raise ValueError(f"save_pretrained: parameter {name!r} is on the meta device and no offload "
                             "store holds it; load real weights first")
        state[ours_to_hf(name)] = t.to("cpu").contiguous()
    return state


def save_pretrained(model, path, max_shard_size="5GB", safe_serialization=True) -> None:
    """Write the Hugging Face layout: config.json, generation_config.json and safetensors shards.

    One ``model.safetensors`` if everything fits in ``max_shard_size``, otherwise
    ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``. Tied models store no
    ``lm_head.weight``. Offloaded weights are gathered one by one; quantized models are refused.

    Example::

        model.save_pretrained("/tmp/ckpt", max_shard_size="500MB")
    """
    if not safe_serialization:
        raise ValueError("save_pretrained: only safe_serialization=True (safetensors) is supported")
    limit = parse_size(max_shard_size)
    state = _gather(model)
    shards: list[dict] = [{}]
    size = 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    os.makedirs(path, exist_ok=True)
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    # Write to temporary names and rename: a model memory-mapped from this very folder keeps
    # reading its old (now unlinked) files instead of seeing them rewritten under it.
    for shard, fname in zip(shards, names):
        tmp = os.path.join(path, fname + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, fname))
    stale = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$")
    for f in os.listdir(path):
        if stale.match(f) and f not in names:
            os.remove(os.path.join(path, f))
    index = os.path.join(path, INDEX_FILE)
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {n: fname for shard, fname in zip(shards, names) for n in shard}
        _write_json(index, {"metadata": {"total_size": total,
                                         "total_parameters": sum(t.numel() for t in state.values())},
                            "weight_map": dict(sorted(weight_map.items()))})
    elif os.path.exists(index):
        os.remove(index)
    cfg = model.cfg.to_dict()
    cfg["torch_dtype"] = dtype_name(next(iter(state.values())).dtype)
    cfg.pop("dtype", None)
    _write_json(os.path.join(path, "config.json"), cfg)
    gen = dict(getattr(model, "generation_config", None) or {})
    if not gen:
        gen = {"_from_model_config": True, "bos_token_id": model.cfg.bos_token_id,
               "eos_token_id": model.cfg.eos_token_id, "pad_token_id": model.cfg.pad_token_id}
    _write_json(os.path.join(path, "generation_config.json"), gen)


def _write_json(file: str, obj) -> None:
    tmp = file + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, file)
