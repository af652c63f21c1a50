"""Memory planning for a run: weights, KV cache and attention patterns, from a config alone.

Example::

    >>> print(estimate_memory("command-r-v01", dtype="bfloat16", batch=1, seq_len=8192))
    command-r-v01 · bfloat16 · batch 1 · 8192 tokens
      weights                   70.0 GB  (34.98 B parameters)
      KV cache                  10.7 GB  (40 layers, 1.3 MB per token)
      pattern (1 layer)          8.6 GB  ([batch head q_pos k_pos] for the prefill)
      ...
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .config import CommandRConfig, dtype_name, parse_dtype

_QUANT_BYTES = {"int8": 1.0, "nf4": 0.5, "fp4": 0.5, "int4": 0.5}


@dataclass
class MemoryEstimate:
    """Bytes a model needs for one forward of ``batch`` x ``seq_len`` tokens.

    ``kv_cache_bytes_per_layer[i]``: keys + values that layer keeps between forwards (sliding
    layers keep at most ``window - 1`` positions); ``pattern_bytes_per_layer[i]``: one
    ``[batch head q_pos k_pos]`` tensor (``hook_pattern`` / ``hook_attn_scores``) for a prefill of
    ``seq_len`` tokens; ``explicit_attention_bytes_per_layer[i]``: the explicit path's peak (scores,
    fp32 softmax and pattern at once).
    """

    name: str
    dtype: str            # activations / unquantized weights; ``weights`` says if linears are quantized
    batch: int
    seq_len: int
    n_params: int
    weight_bytes: int
    kv_cache_bytes: int
    kv_cache_bytes_per_layer: list = field(repr=False)
    pattern_bytes_per_layer: list = field(repr=False)
    explicit_attention_bytes_per_layer: list = field(repr=False)
    residual_bytes: int = 0          # one [batch pos d_model] activation
    weights: Optional[str] = None    # None, "int8", "nf4" or "fp4"
    local_layers: list = field(default_factory=list)
    global_layers: list = field(default_factory=list)

    @property
    def pattern_bytes(self) -> int:
        """The largest single layer's [batch head q_pos k_pos] pattern."""
        return max(self.pattern_bytes_per_layer)

    @property
    def total_bytes(self) -> int:
        """Weights + KV cache: the floor for a fused-attention run (add the explicit peak for patterns)."""
        return self.weight_bytes + self.kv_cache_bytes

    def rows(self) -> list[tuple[str, str, str]]:
        L = len(self.kv_cache_bytes_per_layer)
        per_token = self.kv_cache_bytes / max(1, self.batch * self.seq_len)
        rows = [
            ("weights", fmt_bytes(self.weight_bytes), f"{self.n_params / 1e9:.2f} B parameters"),
            ("KV cache", fmt_bytes(self.kv_cache_bytes), f"{L} layers, {fmt_bytes(per_token)} per token"),
            ("pattern (1 layer)", fmt_bytes(self.pattern_bytes), "[batch head q_pos k_pos] for the prefill"),
            ("explicit attn peak", fmt_bytes(max(self.explicit_attention_bytes_per_layer)),
             "scores + fp32 softmax + pattern, 1 layer"),
            ("all patterns cached", fmt_bytes(sum(self.pattern_bytes_per_layer)),
             "run_with_cache of every hook_pattern"),
            ("residual (1 hook)", fmt_bytes(self.residual_bytes), "[batch pos d_model]"),
            ("total (floor)", fmt_bytes(self.total_bytes), "weights + KV cache; add the explicit peak for patterns"),
        ]
        if self.local_layers:
            rows.append(("layers", f"{len(self.local_layers)} local / {len(self.global_layers)} global",
                         f"global (NoPE, full attention): {self.global_layers}"))
        return rows

    def __str__(self) -> str:
        quant = f" (linear weights {self.weights})" if self.weights else ""
        head = f"{self.name} · {self.dtype}{quant} · batch {self.batch} · {self.seq_len} tokens"
        return "\n".join([head] + [f"  {a:<20} {b:>12}  ({c})" for a, b, c in self.rows()])

    def _repr_html_(self) -> str:
        body = "".join(f"<tr><td>{html.escape(a)}</td><td style='text-align:right'>{html.escape(b)}</td>"
                       f"<td>{html.escape(c)}</td></tr>" for a, b, c in self.rows())
        return f"<b>{html.escape(str(self).splitlines()[0])}</b><table>{body}</table>"


def fmt_bytes(n: float) -> str:
    """Decimal units, as disk and GPU vendors quote them: 70e9 -> '70.0 GB'."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _element_bytes(dtype) -> float:
    return torch.empty((), dtype=parse_dtype(dtype)).element_size()


def estimate_memory(config_or_preset: Union[CommandRConfig, str], dtype="bfloat16", batch: int = 1,
                    seq_len: int = 8192, weights: Optional[str] = None) -> MemoryEstimate:
    """Plan a run: weight bytes, KV-cache bytes and per-layer attention-pattern bytes.

    ``config_or_preset``: a ``CommandRConfig``, a preset name (``"command-r-plus"``) or a checkpoint
    folder. ``weights``: None (the linear layers in ``dtype``), ``"int8"`` or ``"nf4"``/``"fp4"`` to
    plan a ``quantization_config`` load (blocks' linear layers quantized; absmax overhead included).

    Example::

        print(estimate_memory("command-r-plus", dtype="bfloat16", seq_len=8192))
    """
    if isinstance(config_or_preset, CommandRConfig):
        cfg, name = config_or_preset, config_or_preset.extra.get("_name_or_path", config_or_preset.model_type)
    elif isinstance(config_or_preset, (str, os.PathLike)) and os.path.isdir(config_or_preset):
        cfg, name = CommandRConfig.from_pretrained(config_or_preset), os.path.basename(os.fspath(config_or_preset))
    elif isinstance(config_or_preset, str):
        cfg, name = CommandRConfig.from_preset(config_or_preset), config_or_preset
    else:
        raise TypeError(f"estimate_memory: expected a CommandRConfig, a preset name or a folder, "
                        f"got {type(config_or_preset).__name__}")
    if batch < 1 or seq_len < 1:
        raise ValueError(f"estimate_memory: batch and seq_len must be >= 1, got {batch}, {seq_len}")
    e = _element_bytes(dtype)
    D, F, H, K, d, L = cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.n_layers
    linear_params = L * (D * H * d * 2 + D * K * d * 2 + 3 * D * F)
    other_params = cfg.n_params - linear_params
    if weights is None:
        weight_bytes = cfg.n_params * e
    elif weights in _QUANT_BYTES:
        # bitsandbytes keeps one fp32 absmax per 64 weights for 4-bit (one per row for int8)
        overhead = 4 / 64 if _QUANT_BYTES[weights] < 1 else 0
        weight_bytes = linear_params * (_QUANT_BYTES[weights] + overhead) + other_params * e
    else:
        raise ValueError(f"weights: expected None, 'int8', 'nf4' or 'fp4', got {weights!r}")
    kv, pattern, explicit = [], [], []
    for i in range(L):
        window = cfg.layer_window(i)
        kept = seq_len if window is None else min(seq_len, window - 1)
        kv.append(int(2 * batch * K * kept * d * e))
        p = batch * H * seq_len * seq_len
        pattern.append(int(p * e))
        explicit.append(int(p * (2 * e + 4)))
    sliding = [i for i in range(L) if cfg.layer_window(i) is not None]
    glob = [i for i in range(L) if cfg.layer_window(i) is None] if sliding else []
    return MemoryEstimate(name=str(name), dtype=dtype_name(parse_dtype(dtype)), batch=batch, seq_len=seq_len,
                          n_params=cfg.n_params, weight_bytes=int(weight_bytes), kv_cache_bytes=sum(kv),
                          kv_cache_bytes_per_layer=kv, pattern_bytes_per_layer=pattern,
                          explicit_attention_bytes_per_layer=explicit,
                          residual_bytes=int(batch * seq_len * D * e), weights=weights, local_layers=sliding, global_layers=glob)
