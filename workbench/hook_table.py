"""The hook table: every hook name with its shape and dtype, computed from the config alone.

Works on a model built on the meta device (plan a 104B model's hooks without its weights)::

    model = HookedCommandR.from_config(CommandRConfig.from_preset("command-r-plus"), device="meta")
    print(format_hook_table(model.hook_table(batch=1, pos=8192)))
"""

from __future__ import annotations

from typing import Optional

import torch

from .hook_names import kind_of


def hook_table(model, batch: int = 1, pos: int = 8, k_pos: Optional[int] = None) -> list[dict]:
    """Rows ``{name, layer, shape, axes, dtype, attention}`` in forward order (axes and dtype from
    the hook vocabulary, ``workbench.hook_names``).

    ``k_pos`` defaults to ``pos`` (no KV cache). ``attention`` says, for block hooks, whether the
    layer is "global" (full attention) or "local (window W)", and whether it rotates.
    """
    cfg = model.cfg
    dims = {"batch": batch, "pos": pos, "q_pos": pos, "k_pos": k_pos or pos, "d_model": cfg.d_model,
            "head": cfg.n_heads, "d_head": cfg.d_head, "d_mlp": cfg.d_mlp,
            "kv_head": cfg.n_heads if cfg.ungroup_grouped_query_attention else cfg.n_kv_heads,  # tl_gqa: per head
            "vocab": cfg.vocab_size, "1": 1}
    rows = []
    for name, hp in model.hook_dict.items():
        spec = kind_of(name)
        axes, dtype = spec.axes, spec.dtype
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
