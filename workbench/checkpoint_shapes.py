"""config.json's sizes checked against a checkpoint's tensor headers, before any module is built.

A size field that disagrees with the weights (``num_hidden_layers: 200000`` for a 40-layer
checkpoint, a wrong ``hidden_size``) would otherwise first build the whole model — minutes and
gigabytes for absurd values — and only then fail on the tensor shapes. These checks read the
safetensors headers only (no tensor data) and name the config field and the tensor that disagree.

Example::

    entries = scan_checkpoint(path)                    # HF name -> TensorEntry (headers only)
    check_sizes(cfg, entries, path)                    # ConfigError naming the field and tensor
"""

from __future__ import annotations

import re

from .config import CommandRConfig, ConfigError

__all__ = ["check_sizes"]

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_sizes(cfg: CommandRConfig, entries: dict, path: str) -> None:
    """Refuse a config whose sizes disagree with the checkpoint's tensors (``entries``: HF name ->
    ``TensorEntry``, as ``loading.scan_checkpoint`` returns), naming the field and the tensor.

    Only the fields a wrong value of which is expensive or silent are checked here; every other
    shape is compared one by one after the (cheap, meta-device) model is built.

    Example::

        check_sizes(CommandRConfig.from_pretrained(path), scan_checkpoint(path), path)
    """
    where = f"{path}/config.json"
    layers = {int(m.group(1)) for name in entries if (m := _LAYER.match(name))}
    if layers and cfg.n_layers != max(layers) + 1:
        last = max(layers)
        raise ConfigError(f"{where}: num_hidden_layers is {cfg.n_layers} but the checkpoint's last layer tensor is "
                          f"model.layers.{last}.* ({last + 1} layers)")
    d_q, d_kv = cfg.n_heads * cfg.d_head, cfg.n_kv_heads * cfg.d_head
    expect = {  # HF tensor -> ((axis, expected size, config fields that give it), ...)
        "model.embed_tokens.weight": ((0, cfg.vocab_size, "vocab_size"), (1, cfg.d_model, "hidden_size")),
        "model.layers.0.self_attn.q_proj.weight": (
            (0, d_q, f"num_attention_heads * head_dim = {cfg.n_heads} * {cfg.d_head}"),
            (1, cfg.d_model, "hidden_size")),
        "model.layers.0.self_attn.k_proj.weight": (
            (0, d_kv, f"num_key_value_heads * head_dim = {cfg.n_kv_heads} * {cfg.d_head}"),),
        "model.layers.0.mlp.gate_proj.weight": ((0, cfg.d_mlp, "intermediate_size"), (1, cfg.d_model, "hidden_size")),
    }
    for name, checks in expect.items():
        entry = entries.get(name)
        if entry is None:
            continue                # a missing tensor is listed by the full check after building
        shape = tuple(entry.shape)
        for axis, size, field in checks:
            if len(shape) != 2 or shape[axis] != size:
                raise ConfigError(f"{where}: {field} gives {size} but tensor {name!r} in {entry.file} has shape "
                                  f"{list(shape)} (axis {axis})")
