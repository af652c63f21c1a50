"""The hook table: every hook name with its shape and dtype, computed from the config alone.

Works on a model built on the meta device (plan a 104B model's hooks without its weights)::

    model = HookedCommandR.from_config(CommandRConfig.from_preset("command-r-plus"), device="meta")
    print(format_hook_table(model.hook_table(batch=1, pos=8192)))
"""

from __future__ import annotations

from typing import Optional

import torch

_SHAPES = {
    "hook_embed": ("batch pos d_model", "model"),
    "hook_resid_pre": ("batch pos d_model", "model"),
    "ln1.hook_scale": ("batch pos 1", "float32"),
    "ln1.hook_normalized": ("batch pos d_model", "model"),
    "attn.hook_q": ("batch pos head d_head", "model"),
    "attn.hook_k": ("batch pos kv_head d_head", "model"),
    "attn.hook_v": ("batch pos kv_head d_head", "model"),
    "attn.hook_q_normed": ("batch pos head d_head", "model"),
    "attn.hook_k_normed": ("batch pos kv_head d_head", "model"),
    "attn.hook_rot_q": ("batch pos head d_head", "model"),
    "attn.hook_rot_k": ("batch pos kv_head d_head", "model"),
    "attn.hook_attn_scores": ("batch head q_pos k_pos", "model"),
    "attn.hook_pattern": ("batch head q_pos k_pos", "model"),
    "attn.hook_z": ("batch pos head d_head", "model"),
    "attn.hook_result": ("batch pos head d_model", "model"),
    "hook_attn_out": ("batch pos d_model", "model"),
    "mlp.hook_pre": ("batch pos d_mlp", "model"),
    "mlp.hook_pre_linear": ("batch pos d_mlp", "model"),
    "mlp.hook_post": ("batch pos d_mlp", "model"),
    "hook_mlp_out": ("batch pos d_model", "model"),
    "hook_resid_post": ("batch pos d_model", "model"),
    "ln_final.hook_scale": ("batch pos 1", "float32"),
    "ln_final.hook_normalized": ("batch pos d_model", "model"),
    "hook_logits_unscaled": ("batch pos vocab", "model"),
    "hook_logits": ("batch pos vocab", "model"),
}


def _suffix(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blocks":
        parts = parts[2:]
    return ".".join(parts)


def hook_table(model, batch: int = 1, pos: int = 8, k_pos: Optional[int] = None) -> list[dict]:
    """Rows ``{name, layer, shape, axes, dtype, attention}`` in forward order.

    ``k_pos`` defaults to ``pos`` (no KV cache). ``attention`` says, for block hooks, whether the
    layer is "global" (full attention) or "local (window W)", and whether it rotates.
    """
    cfg = model.cfg
    dims = {"batch": batch, "pos": pos, "q_pos": pos, "k_pos": k_pos or pos, "d_model": cfg.d_model,
            "head": cfg.n_heads, "kv_head": cfg.n_kv_heads, "d_head": cfg.d_head, "d_mlp": cfg.d_mlp,
            "vocab": cfg.vocab_size, "1": 1}
    rows = []
    for name, hp in model.hook_dict.items():
        axes, dtype = _SHAPES[_suffix(name)]
        row = {
            "name": name,
            "layer": hp.layer,
            "shape": tuple(dims[a] for a in axes.split()),
            "axes": axes,
            "dtype": torch.float32 if dtype == "float32" else model.dtype,
        }
        if hp.layer is not None:
            window = cfg.layer_window(hp.layer)
            kind = "global" if window is None else f"local (window {window})"
            row["attention"] = kind + ("" if cfg.layer_uses_rope(hp.layer) else ", no rotary")
        rows.append(row)
    return rows


def format_hook_table(rows: list[dict]) -> str:
    """A plain-text table (one line per hook) for printing in a notebook."""
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'hook':<{width}}  {'shape':<28} {'axes':<26} dtype"]
    for r in rows:
        shape = "[" + ", ".join(map(str, r["shape"])) + "]"
        dtype = str(r["dtype"]).replace("torch.", "")
        extra = f"  {r['attention']}" if "attention" in r and r["name"].endswith("hook_resid_pre") else ""
        lines.append(f"{r['name']:<{width}}  {shape:<28} {r['axes']:<26} {dtype}{extra}")
    return "\n".join(lines)
