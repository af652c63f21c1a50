"""4-bit / 8-bit loading with bitsandbytes (an optional extra: ``pip install commandr-workbench[quantization]``).

The linear layers inside the blocks (q/k/v/o, gate/up/down) become ``bnb.nn.Linear4bit`` or
``bnb.nn.Linear8bitLt``; the embedding, the (tied) unembedding and the LayerNorms stay in the model
dtype, as in transformers. Each weight is quantized as it is read, so the full-precision model never
exists in memory. Every hook keeps working: hooks sit on activations, ``hook_result`` runs the
quantized o_proj per head, and ``attn.W_O`` returns the dequantized weight (``weights.dense_weight``).

Recent bitsandbytes releases (>= 0.45) run both formats on the CPU.

Example::

    q = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = HookedCommandR.from_pretrained(path, quantization_config=q)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .config import dtype_name, parse_dtype
from .weights import dense_weight, require_bitsandbytes, torch_device

__all__ = ["LINEAR_NAMES", "QuantizationConfig", "dense_weight", "is_quantized", "replace_linear_layers",
           "require_bitsandbytes"]

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Keys of transformers' BitsAndBytesConfig.to_dict() that carry no setting of their own.
_IGNORED_KEYS = {"quant_method", "_load_in_4bit", "_load_in_8bit", "llm_int8_enable_fp32_cpu_offload"}


@dataclass
class QuantizationConfig:
    """bitsandbytes settings under transformers' ``BitsAndBytesConfig`` field names.

    ``llm_int8_skip_modules``: module names (or name fragments, e.g. ``"mlp"``, ``"blocks.0."``) whose
    linear layers stay unquantized. ``bnb_4bit_compute_dtype`` None -> the model dtype.

    Example::

        QuantizationConfig(load_in_8bit=True, llm_int8_skip_modules=["o_proj"])
        QuantizationConfig.coerce(transformers.BitsAndBytesConfig(load_in_4bit=True))
    """

    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "fp4"
    bnb_4bit_compute_dtype: Any = None
    bnb_4bit_use_double_quant: bool = False
    bnb_4bit_quant_storage: Any = "uint8"
    llm_int8_threshold: float = 6.0
    llm_int8_skip_modules: Optional[list] = None
    llm_int8_has_fp16_weight: bool = False

    def __post_init__(self) -> None:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("QuantizationConfig: load_in_4bit and load_in_8bit are exclusive; set one")
        if self.bnb_4bit_quant_type not in ("fp4", "nf4"):
            raise ValueError(f"bnb_4bit_quant_type: expected 'fp4' or 'nf4', got {self.bnb_4bit_quant_type!r}")
        if self.bnb_4bit_compute_dtype is not None:
            self.bnb_4bit_compute_dtype = parse_dtype(self.bnb_4bit_compute_dtype, "bnb_4bit_compute_dtype")
        storage = self.bnb_4bit_quant_storage
        if isinstance(storage, str):
            storage = getattr(torch, storage.replace("torch.", ""), None)
        if not isinstance(storage, torch.dtype):
            raise ValueError(f"bnb_4bit_quant_storage: not a torch dtype: {self.bnb_4bit_quant_storage!r}")
        self.bnb_4bit_quant_storage = storage
        if self.llm_int8_has_fp16_weight:
            raise ValueError("llm_int8_has_fp16_weight=True (8-bit training) is not supported; expected False")
        if isinstance(self.llm_int8_skip_modules, str):
            self.llm_int8_skip_modules = [self.llm_int8_skip_modules]

    @property
    def enabled(self) -> bool:
        return self.load_in_4bit or self.load_in_8bit

    @property
    def bits(self) -> Optional[int]:
        return 4 if self.load_in_4bit else 8 if self.load_in_8bit else None

    @classmethod
    def coerce(cls, obj) -> "QuantizationConfig":
        """Accept our config, a dict, or any object with ``to_dict()`` (transformers' BitsAndBytesConfig)."""
        if isinstance(obj, cls):
            return obj
        if hasattr(obj, "to_dict") and not isinstance(obj, dict):
            obj = obj.to_dict()
        if not isinstance(obj, dict):
            raise TypeError(f"quantization_config: expected a QuantizationConfig, a dict or a BitsAndBytesConfig, "
                            f"got {type(obj).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in obj if k not in fields and k not in _IGNORED_KEYS)
        if unknown:
            raise ValueError(f"quantization_config: unknown field(s) {unknown}; known: {sorted(fields)}")
        if obj.get("quant_method", "bitsandbytes") != "bitsandbytes":
            raise ValueError(f"quantization_config: quant_method {obj['quant_method']!r} is not supported; "
                             "expected 'bitsandbytes'")
        return cls(**{k: v for k, v in obj.items() if k in fields})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["bnb_4bit_compute_dtype"] = dtype_name(self.bnb_4bit_compute_dtype)
        d["bnb_4bit_quant_storage"] = dtype_name(self.bnb_4bit_quant_storage)
        d["quant_method"] = "bitsandbytes"
        return d

    # ---------------------------------------------------------------------- which layers
    def should_quantize(self, param_name: str) -> bool:
        """True for ``blocks.{i}.attn.q_proj.weight`` & co. unless a skip entry matches the module."""
        module, _, attr = param_name.rpartition(".")
        if attr != "weight" or not module.startswith("blocks.") or module.rsplit(".", 1)[-1] not in LINEAR_NAMES:
            return False
        return not any(_skip_matches(module, skip) for skip in self.llm_int8_skip_modules or ())

    def new_module(self, linear: nn.Linear, dtype: torch.dtype) -> nn.Module:
        bnb = require_bitsandbytes()
        if self.load_in_4bit:
            return bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False,
                                     compute_dtype=self.bnb_4bit_compute_dtype or dtype,
                                     compress_statistics=self.bnb_4bit_use_double_quant,
                                     quant_type=self.bnb_4bit_quant_type,
                                     quant_storage=self.bnb_4bit_quant_storage, device="meta")
        return _linear8bit_class()(linear.in_features, linear.out_features, bias=False,
                                   has_fp16_weights=False, threshold=self.llm_int8_threshold, device="meta")

    def quantize(self, weight: torch.Tensor, device, module: nn.Module) -> nn.Parameter:
        """Full-precision ``weight`` -> a quantized bitsandbytes parameter on ``device``."""
        bnb = require_bitsandbytes()
        device = torch_device(device)
        if self.load_in_4bit:
            p = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=self.bnb_4bit_quant_type,
                                  compress_statistics=self.bnb_4bit_use_double_quant,
                                  quant_storage=self.bnb_4bit_quant_storage, module=module)
        else:
            p = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        return p.to(device)


_LINEAR8BIT = None


def _linear8bit_class():
    """``bnb.nn.Linear8bitLt`` that accepts any number of leading axes.

    bitsandbytes' CPU int8 kernel quantizes rows of a 2-D or 3-D input only; the per-head
    ``hook_result`` path feeds o_proj a [batch pos head (head d_head)] input, so flatten around it.
    """
    global _LINEAR8BIT
    if _LINEAR8BIT is None:
        bnb = require_bitsandbytes()

        class Linear8bitLt(bnb.nn.Linear8bitLt):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                lead = x.shape[:-1]
                return super().forward(x.reshape(-1, x.shape[-1])).reshape(*lead, -1)

        _LINEAR8BIT = Linear8bitLt
    return _LINEAR8BIT


def replace_linear_layers(model: nn.Module, quant: QuantizationConfig, dtype: torch.dtype) -> list[str]:
    """Swap the blocks' nn.Linear modules (on meta) for bitsandbytes ones; returns their names."""
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and quant.should_quantize(name + ".weight"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, quant.new_module(module, dtype))
            swapped.append(name)
    model.quantization_config = quant
    model.is_loaded_in_4bit, model.is_loaded_in_8bit = quant.load_in_4bit, quant.load_in_8bit
    return swapped


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization_config", None) is not None


# transformers' module names -> ours, so BitsAndBytesConfig skip lists written for HF checkpoints work
_HF_PARTS = (("model.layers.", "blocks."), ("self_attn", "attn"), ("model.embed_tokens", "embed"),
             ("lm_head", "unembed"))


def _skip_matches(module: str, skip: str) -> bool:
    """Whole dotted components: "blocks.1" skips blocks.1.* but not blocks.10.*; "o_proj" every o_proj."""
    for hf, ours in _HF_PARTS:
        skip = skip.replace(hf, ours)
    return f".{skip.strip('.')}." in f".{module}."
