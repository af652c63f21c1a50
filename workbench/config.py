"""CommandRConfig: one object for every Cohere checkpoint, read from its ``config.json``.

HF key names are mapped to ours once, here (``hidden_size`` -> ``d_model`` and so on), derived
values (``d_head``, the GQA group size, which layers slide and which rotate) are computed once, and
inconsistent values are refused with the field named. Both spellings real checkpoints use are read:
transformers 4.x (``rope_theta``, ``rope_scaling``, ``torch_dtype``) and 5.x (``rope_parameters``,
``dtype``).

Example::

    cfg = CommandRConfig.from_pretrained("path/to/c4ai-command-r-v01")   # folder or config.json
    cfg = CommandRConfig.from_preset("command-r-plus")                    # no weights needed
    cfg.n_layers, cfg.d_head, cfg.layer_is_sliding(3)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .tl_config import TLConfigMixin

SUPPORTED_MODEL_TYPES = ("cohere", "cohere2")
FULL, SLIDING = "full_attention", "sliding_attention"

_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "float16": torch.float16, "half": torch.float16, "fp16": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(value: Any, what: str = "dtype") -> Optional[torch.dtype]:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16`` (None stays None)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        key = value.replace("torch.", "")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"{what}: unsupported dtype {value!r}; expected one of float32, float16, bfloat16")


def dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    return None if dtype is None else str(dtype).replace("torch.", "")


class ConfigError(ValueError):
    """A config.json value that is missing or inconsistent; the message names the field."""


@dataclass
class CommandRConfig(TLConfigMixin):
    """Hyperparameters of a Command-R family model, in TransformerLens-style names.

    ``layer_types`` holds, per layer, ``"full_attention"`` or ``"sliding_attention"`` (cohere2);
    for ``cohere`` every layer is full attention with rotary.
    """

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    d_mlp: int
    n_kv_heads: Optional[int] = None
    d_head: Optional[int] = None
    model_type: str = "cohere"
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    layer_norm_eps: float = 1e-5
    logit_scale: float = 0.0625
    use_qk_norm: bool = False
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 8192
    hidden_act: str = "silu"
    attention_bias: bool = False
    bos_token_id: Optional[int] = 5
    eos_token_id: Any = 255001
    pad_token_id: Optional[int] = 0
    torch_dtype: Optional[torch.dtype] = None
    sliding_window: Optional[int] = None
    layer_types: Optional[list] = None
    extra: dict = field(default_factory=dict, repr=False)  # unknown keys, kept for save_pretrained

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        try:
            self.torch_dtype = parse_dtype(self.torch_dtype, "torch_dtype")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self._validate_and_derive()

    # ------------------------------------------------------------------ validation
    def _validate_and_derive(self) -> None:
        for name in _BOOL_FIELDS:          # "false" (a string) must never read as True
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}: expected true or false (a JSON boolean), got {getattr(self, name)!r}")
        for name in _POSITIVE_FLOATS:      # NaN, inf, 0 or negative give silently wrong numbers
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or value <= 0):
                raise ConfigError(f"{name}: expected a finite positive number, got {value!r}")
        if (not isinstance(self.max_position_embeddings, int) or isinstance(self.max_position_embeddings, bool)
                or self.max_position_embeddings <= 0):
            raise ConfigError(f"max_position_embeddings: expected a positive integer, "
                              f"got {self.max_position_embeddings!r}")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type: {self.model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        for name in ("bos_token_id", "pad_token_id", "eos_token_id"):
            value = getattr(self, name)
            values = value if isinstance(value, list) and name == "eos_token_id" else [value]
            if any(v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0) for v in values):
                raise ConfigError(f"{name}: expected a non-negative integer token id, got {value!r}")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_mlp"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{_HF_NAME.get(name, name)}: expected a positive integer, got {value!r}")
            if value > (_MAX_LAYERS if name == "n_layers" else _MAX_SIZE):   # absurd: refuse before building lists
                raise ConfigError(f"{_HF_NAME.get(name, name)}: {value} is absurdly large (at most "
                                  f"{_MAX_LAYERS if name == 'n_layers' else _MAX_SIZE})")
        if self.d_head is not None and (not isinstance(self.d_head, int) or isinstance(self.d_head, bool)
                                        or self.d_head <= 0):
            raise ConfigError(f"head_dim: expected a positive integer, got {self.d_head!r}")
        if self.d_head is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"hidden_size ({self.d_model}) is not divisible by num_attention_heads ({self.n_heads})"
                )
            self.d_head = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_key_value_heads ({self.n_kv_heads}) does not divide num_attention_heads ({self.n_heads})"
            )
        if self.d_head % 2:
            raise ConfigError(f"head_dim ({self.d_head}) must be even for interleaved rotary embeddings")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act: only 'silu' is supported, got {self.hidden_act!r}")
        if self.attention_bias:
            raise ConfigError("attention_bias: Command-R models have no attention biases; expected false")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            raise ConfigError(f"rope_scaling: expected an object or null, got {self.rope_scaling!r}")
        if self.rope_scaling and self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) not in (None, "default"):
            raise ConfigError(
                f"rope_scaling: only the default rotary embedding is supported, got {self.rope_scaling!r}"
            )
        if self.layer_types is not None and not isinstance(self.layer_types, (list, tuple)):
            raise ConfigError(f"layer_types: expected a list, got {type(self.layer_types).__name__}")
        if self.model_type == "cohere":
            if self.layer_types is None:
                self.layer_types = [FULL] * self.n_layers
            if SLIDING in self.layer_types or self.sliding_window is not None:
                raise ConfigError("layer_types/sliding_window: cohere models have only full attention "
                                  "(transformers' CohereForCausalLM ignores these keys); use model_type cohere2")
        else:
            if self.use_qk_norm:
                raise ConfigError("use_qk_norm: cohere2 models have no QK-norm; expected false")
            if self.layer_types is None:
                pattern = self.extra.get("sliding_window_pattern", 4)
                if not isinstance(pattern, int) or pattern <= 0:
                    raise ConfigError(f"sliding_window_pattern: expected a positive integer, got {pattern!r}")
                self.layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(self.n_layers)]
            if self.sliding_window is None and SLIDING in self.layer_types:
                raise ConfigError("sliding_window: required when a layer is 'sliding_attention' "
                                  "(transformers would default to 4096; real configs always give it)")
            if self.sliding_window is not None and (not isinstance(self.sliding_window, int)
                                                    or isinstance(self.sliding_window, bool) or self.sliding_window <= 0):
                raise ConfigError(f"sliding_window: expected a positive integer, got {self.sliding_window!r}")
        if len(self.layer_types) != self.n_layers:
            raise ConfigError(
                f"layer_types: has {len(self.layer_types)} entries, expected num_hidden_layers = {self.n_layers}"
            )
        bad = [t for t in self.layer_types if not isinstance(t, str) or t not in (FULL, SLIDING)]
        if bad:
            raise ConfigError(f"layer_types: unknown entries {sorted(set(map(repr, bad)))}; "
                              f"expected {FULL!r} or {SLIDING!r}")

    # ------------------------------------------------------------------ derived
    @property
    def group_size(self) -> int:
        """Query heads per key/value head (GQA); query head j reads kv head j // group_size."""
        return self.n_heads // self.n_kv_heads

    def layer_is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def layer_window(self, layer: int) -> Optional[int]:
        """Keys visible to a query on this layer (None = all previous keys)."""
        return self.sliding_window if self.layer_is_sliding(layer) else None

    def layer_uses_rope(self, layer: int) -> bool:
        """Command-R rotates on every layer; cohere2 only on sliding layers (global layers are NoPE)."""
        return self.model_type == "cohere" or self.layer_is_sliding(layer)

    @property
    def n_params(self) -> int:
        D, F, L = self.d_model, self.d_mlp, self.n_layers
        attn = D * self.n_heads * self.d_head * 2 + D * self.n_kv_heads * self.d_head * 2
        qk = (self.n_heads + self.n_kv_heads) * self.d_head if self.use_qk_norm else 0
        per_layer = attn + 3 * D * F + D + qk
        unembed = 0 if self.tie_word_embeddings else self.vocab_size * D
        return self.vocab_size * D + L * per_layer + D + unembed

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_dict(cls, d: dict) -> "CommandRConfig":
        """Build from a config.json dict (transformers 4.x or 5.x spelling)."""
        if not isinstance(d, dict):
            raise ConfigError(f"config: expected a dict (a JSON object), got {type(d).__name__}")
        d = dict(d)
        model_type = d.get("model_type")
        if model_type is None:
            raise ConfigError("model_type: missing from config.json (expected 'cohere' or 'cohere2')")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type: {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        d = {k: v for k, v in d.items() if v is not None}   # null means absent, as in transformers
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"config.json is missing required keys (or has them null): {missing}")
        rope = d.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_parameters: expected an object, got {rope!r}")
        rope_theta = d.get("rope_theta", rope.get("rope_theta"))
        if rope_theta is None:  # transformers 5.x defaults when absent; every released config sets it
            rope_theta = 500000.0 if model_type == "cohere" else 10000.0
        rope_scaling = d.get("rope_scaling")
        if rope_scaling is None and rope.get("rope_type", "default") != "default":
            rope_scaling = rope
        dtype = d.get("torch_dtype", d.get("dtype"))
        def num(key, default, kind=float):
            value = default if key == "rope_theta" else d.get(key, default)
            if isinstance(value, bool) or not isinstance(value, (int, float)):   # JSON numbers only
                raise ConfigError(f"{key}: expected a number, got {value!r}")
            if kind is int:
                if isinstance(value, float) and not value.is_integer():        # also inf and NaN
                    raise ConfigError(f"{key}: expected an integer, got {value!r}")
                return int(value)
            return float(value)

        kwargs = dict(
            vocab_size=d["vocab_size"],
            d_model=d["hidden_size"],
            n_layers=d["num_hidden_layers"],
            n_heads=d["num_attention_heads"],
            d_mlp=d["intermediate_size"],
            n_kv_heads=d.get("num_key_value_heads"),
            d_head=d.get("head_dim"),
            model_type=model_type,
            rope_theta=num("rope_theta", rope_theta),
            rope_scaling=rope_scaling,
            layer_norm_eps=num("layer_norm_eps", 1e-5),
            logit_scale=num("logit_scale", 0.0625),
            use_qk_norm=d.get("use_qk_norm", False),
            tie_word_embeddings=d.get("tie_word_embeddings", True),
            max_position_embeddings=num("max_position_embeddings", 8192, int),
            hidden_act=d.get("hidden_act", "silu"),
            attention_bias=d.get("attention_bias", False),
            bos_token_id=d.get("bos_token_id", 5),
            eos_token_id=d.get("eos_token_id", 255001),
            pad_token_id=d.get("pad_token_id", 0),
            torch_dtype=dtype,
            sliding_window=d.get("sliding_window") if model_type == "cohere2" else None,
            layer_types=d.get("layer_types") if model_type == "cohere2" else None,
        )
        known = set(_REQUIRED) | _KNOWN_OPTIONAL
        if model_type == "cohere":   # transformers' CohereForCausalLM ignores these: keep them for saving only
            known = known - {"sliding_window", "layer_types"}
        kwargs["extra"] = {k: v for k, v in d.items() if k not in known}
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "CommandRConfig":
        """Read ``config.json`` from a checkpoint folder (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.exists(file):
            raise FileNotFoundError(f"config.json not found: {file}")
        with open(file, "rb") as f:
            raw = f.read()
        try:
            d = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"{file}: not UTF-8 text ({e})") from None
        except (json.JSONDecodeError, RecursionError) as e:
            raise ConfigError(f"{file}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise ConfigError(f"{file}: expected a JSON object, got {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{file}: {e}") from None

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CommandRConfig":
        """A released checkpoint's architecture (``PRESETS``), e.g. ``"command-r-plus"``; build on meta to plan."""
        key = name.lower().split("/")[-1].replace("c4ai-", "")
        if key not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
        d = {**PRESETS[key], **overrides}
        return cls.from_dict(d)

    def to_dict(self) -> dict:
        """config.json in transformers' spelling (4.x keys, which 5.x also reads)."""
        arch = "CohereForCausalLM" if self.model_type == "cohere" else "Cohere2ForCausalLM"
        d = dict(self.extra)
        d.update(
            architectures=[arch],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.d_model,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.d_head,
            intermediate_size=self.d_mlp,
            hidden_act=self.hidden_act,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            layer_norm_eps=self.layer_norm_eps,
            logit_scale=self.logit_scale,
            use_qk_norm=self.use_qk_norm,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            attention_bias=self.attention_bias,
            attention_dropout=0.0,
            bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
        )
        if self.torch_dtype is not None:
            d["torch_dtype"] = dtype_name(self.torch_dtype)
        if self.model_type == "cohere2":
            d.pop("use_qk_norm")
            d["sliding_window"] = self.sliding_window
            d["layer_types"] = list(self.layer_types)
        return d

    def fingerprint(self) -> dict:
        """The fields that decide activation shapes and meaning (used to match saved caches)."""
        keys = ("model_type", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_head",
                "d_mlp", "use_qk_norm", "logit_scale", "rope_theta", "sliding_window")
        return {k: getattr(self, k) for k in keys} | {"layer_types": list(self.layer_types)}

    def replace(self, **changes) -> "CommandRConfig":
        return dataclasses.replace(self, **changes)


_HF_NAME = {"vocab_size": "vocab_size", "d_model": "hidden_size", "n_layers": "num_hidden_layers",
            "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "d_mlp": "intermediate_size"}
_MAX_LAYERS, _MAX_SIZE = 1_000_000, 2**31 - 1
_BOOL_FIELDS = ("use_qk_norm", "tie_word_embeddings", "attention_bias")
_POSITIVE_FLOATS = ("rope_theta", "layer_norm_eps", "logit_scale")
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
_KNOWN_OPTIONAL = {
    "model_type", "num_key_value_heads", "head_dim", "rope_theta", "rope_scaling", "rope_parameters",
    "layer_norm_eps", "logit_scale", "use_qk_norm", "tie_word_embeddings", "max_position_embeddings",
    "hidden_act", "attention_bias", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
    "sliding_window", "layer_types", "architectures", "attention_dropout", "transformers_version",
    "initializer_range", "use_cache",
}


def _preset(D, L, H, K, F, theta, qk, scale, model_type="cohere", **kw):
    d = dict(model_type=model_type, vocab_size=256000, hidden_size=D, num_hidden_layers=L,
             num_attention_heads=H, num_key_value_heads=K, intermediate_size=F, rope_theta=theta,
             logit_scale=scale, layer_norm_eps=1e-5, max_position_embeddings=8192,
             tie_word_embeddings=True, torch_dtype="float16", bos_token_id=5, eos_token_id=255001,
             pad_token_id=0)
    if model_type == "cohere":
        d["use_qk_norm"] = qk
    d.update(kw)
    return d


# Released checkpoints' shapes, from their public config.json files or, where those were not available,
# third-party preset tables (e.g. command-r-plus-08-2024 is assumed to have command-r-plus's shape and
# rope_theta): best public guesses. A real checkpoint's config.json always wins.
PRESETS = {
    "command-r-v01": _preset(8192, 40, 64, 64, 22528, 8e6, False, 0.0625),
    "command-r-plus": _preset(12288, 64, 96, 8, 33792, 7.5e7, True, 0.8333333333333334),
    "command-r-08-2024": _preset(8192, 40, 64, 8, 24576, 4e6, False, 0.0625),
    "command-r-plus-08-2024": _preset(12288, 64, 96, 8, 33792, 7.5e7, True, 0.8333333333333334),
    "aya-23-8b": _preset(4096, 32, 32, 8, 14336, 1e4, False, 0.0625),
    "aya-23-35b": _preset(8192, 40, 64, 64, 22528, 8e6, False, 0.0625),
    "aya-expanse-8b": _preset(4096, 32, 32, 8, 14336, 1e4, False, 0.125),
    "aya-expanse-32b": _preset(8192, 40, 64, 8, 24576, 4e6, False, 0.0625),
    "command-r7b-12-2024": _preset(4096, 32, 32, 8, 14336, 5e4, False, 0.25, model_type="cohere2",
                                   sliding_window=4096, sliding_window_pattern=4),
    "command-a-03-2025": _preset(12288, 64, 96, 8, 36864, 5e4, False, 0.25, model_type="cohere2",
                                 sliding_window=4096, sliding_window_pattern=4),
}
