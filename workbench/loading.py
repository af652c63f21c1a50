"""Checkpoint I/O: HF tensor names <-> ours in one table, random init, load and save.

(Minimal version: single ``model.safetensors``; the loading issue extends it.)
"""

from __future__ import annotations

import json
import os
import re
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import CommandRConfig, parse_dtype

# HF name <-> our name, one row per tensor kind; "{i}" is the layer index. Used both ways.
NAME_MAP = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.ln1.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blocks.{i}.attn.q_proj.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blocks.{i}.attn.k_proj.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blocks.{i}.attn.v_proj.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.o_proj.weight"),
    ("model.layers.{i}.self_attn.q_norm.weight", "blocks.{i}.attn.q_norm.weight"),
    ("model.layers.{i}.self_attn.k_norm.weight", "blocks.{i}.attn.k_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blocks.{i}.mlp.gate_proj.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "blocks.{i}.mlp.up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blocks.{i}.mlp.down_proj.weight"),
    ("model.norm.weight", "ln_final.weight"),
    ("lm_head.weight", "unembed.weight"),
]


def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_HF_TO_OURS = [(_pattern(hf), ours) for hf, ours in NAME_MAP]
_OURS_TO_HF = [(_pattern(ours), hf) for hf, ours in NAME_MAP]


def _rename(name: str, table) -> Optional[str]:
    for pat, template in table:
        m = pat.match(name)
        if m:
            return template.replace("{i}", m.groupdict().get("i") or "")
    return None


def hf_to_ours(name: str) -> Optional[str]:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``"blocks.3.mlp.up_proj.weight"`` (None if unknown)."""
    return _rename(name, _HF_TO_OURS)


def ours_to_hf(name: str) -> str:
    hf = _rename(name, _OURS_TO_HF)
    if hf is None:
        raise KeyError(f"no Hugging Face name for parameter {name!r}")
    return hf


@torch.no_grad()
def init_random(model, dtype=None, seed: Optional[int] = None):
    """normal(0, 0.02) linear/embedding weights, ones for norms (like transformers' init)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if model.device.type != "meta":
        for name, p in model.named_parameters():
            if name.endswith("ln1.weight") or name.endswith("norm.weight") or name == "ln_final.weight":
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    if dtype is not None:
        model.to(parse_dtype(dtype))
    return model


def load_pretrained(cls, path, torch_dtype=None, dtype=None, device=None, **kwargs):
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    cfg = CommandRConfig.from_pretrained(path)
    want = torch_dtype if torch_dtype is not None else dtype
    if want == "auto":
        target = cfg.torch_dtype or torch.float32
    else:
        target = parse_dtype(want) or torch.float32
    with torch.device("meta"):
        model = cls(cfg)
    file = os.path.join(path, "model.safetensors")
    state = {}
    with safe_open(file, framework="pt") as f:
        for hf_name in f.keys():
            ours = hf_to_ours(hf_name)
            if ours is None:
                raise KeyError(f"{file}: unexpected tensor {hf_name!r}")
            state[ours] = f.get_tensor(hf_name).to(target)
    if "unembed.weight" not in state and cfg.tie_word_embeddings:
        state["unembed.weight"] = state["embed.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    if cfg.tie_word_embeddings:
        model.unembed.weight = model.embed.weight
    if device is not None:
        model.to(device)
    return model.eval()


def save_pretrained(model, path, **kwargs) -> None:
    os.makedirs(path, exist_ok=True)
    state = {}
    for name, p in model.state_dict().items():
        if name == "unembed.weight" and model.cfg.tie_word_embeddings:
            continue
        state[ours_to_hf(name)] = p.detach().contiguous().cpu()
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.cfg.to_dict()
    cfg["torch_dtype"] = str(model.dtype).replace("torch.", "")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
