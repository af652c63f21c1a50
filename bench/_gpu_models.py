"""gpu_check's models: random weights at a released checkpoint's widths, built once on the device and
shared by our ``HookedCommandR`` and transformers' ``Cohere(2)ForCausalLM`` (no second copy).

Ours is planned on the meta device, cast there, materialised with ``to_empty`` and filled in place
(normal(0, 0.02) matrices, normal(1, 0.1) norm weights: non-unit norms leave no accidental
shortcut). transformers' model is then built on meta and given *our* tensors with
``load_state_dict(assign=True)`` under the HF names of ``workbench.loading.NAME_MAP``; only its
rotary ``inv_freq`` buffers (non-persistent, never in a checkpoint) are computed fresh, the same way
its own ``__init__`` does. ``share_check`` proves the sharing: every HF parameter's ``data_ptr``
is one of ours.

Example::

    spec = real_spec("command-r-plus", layers=2)
    ours, hf = build_pair(spec, torch.bfloat16, "cuda")
    share_check(ours, hf)          # {"tensors": 15, "shared": True}
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from workbench import HookedCommandR
from workbench.config import CommandRConfig
from workbench.loading import ours_to_hf

# The three shapes issue 13 names, with the layer count gpu_check uses by default (Command A needs 4
# layers to reach its first global, NoPE, layer: 3 sliding + 1 full).
PRESETS = {"command-r-v01": 2, "command-r-plus": 2, "command-a-03-2025": 4}

# --tiny: the same attention layouts (MHA / GQA + QK-norm / GQA + sliding window + NoPE global
# layer) at widths a CPU runs in milliseconds.
TINY = {
    "command-r-v01": dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=176,
                          head_dim=16),
    "command-r-plus": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=256,
                           head_dim=16),
    "command-a-03-2025": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, intermediate_size=256,
                              head_dim=16, sliding_window=8, sliding_window_pattern=2),
}
TINY_LAYERS = {"command-r-v01": 2, "command-r-plus": 2, "command-a-03-2025": 2}   # cohere2: sliding + global
TINY_VOCAB = 211


@dataclass
class Spec:
    """One model to check: preset name, its config (few layers), a short label for the table."""

    preset: str
    cfg: CommandRConfig
    label: str = field(default="")
    init_std: float = 0.02          # tiny widths need larger weights, or layers add ~nothing to the
                                    # tied embedding and greedy decoding repeats the last token


def _label(preset: str, cfg: CommandRConfig) -> str:
    kind = "MHA" if cfg.n_kv_heads == cfg.n_heads else ("MQA" if cfg.n_kv_heads == 1 else "GQA")
    return (f"{preset} {cfg.n_layers}L d{cfg.d_model} {cfg.n_heads}/{cfg.n_kv_heads}h {kind}"
            f"{' qk-norm' if cfg.use_qk_norm else ''}{f' sw{cfg.sliding_window}' if cfg.sliding_window else ''}")


def real_spec(preset: str, layers: int | None = None) -> Spec:
    """The preset's real widths with ``layers`` layers (default: ``PRESETS[preset]``)."""
    cfg = CommandRConfig.from_preset(preset, num_hidden_layers=layers or PRESETS[preset])
    return Spec(preset, cfg, _label(preset, cfg))


def tiny_spec(preset: str, layers: int | None = None) -> Spec:
    """The preset's attention layout at tiny widths (and a small sliding window for cohere2)."""
    over = dict(TINY[preset], vocab_size=TINY_VOCAB, num_hidden_layers=layers or TINY_LAYERS[preset],
                max_position_embeddings=512, eos_token_id=6)
    cfg = CommandRConfig.from_preset(preset, **over)
    return Spec(preset, cfg, _label(preset, cfg), init_std=0.2)


@torch.no_grad()
def build_ours(cfg: CommandRConfig, dtype: torch.dtype, device, seed: int = 0, std: float = 0.02) -> HookedCommandR:
    """Our model with random weights (normal(0, ``std``) matrices), allocated once in ``dtype`` on ``device``."""
    with torch.device("meta"):
        model = HookedCommandR(cfg)
    model.to(dtype)                                   # free on meta: no fp32 copy at real widths
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:                       # to_empty gives each module its own tensor
        model.unembed.weight = model.embed.weight
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("ln1.weight") or name == "ln_final.weight":
            p.normal_(1.0, 0.1, generator=gen)
        else:
            p.normal_(0.0, std, generator=gen)
    return model.eval()


def hf_config(cfg: CommandRConfig, attn: str = "eager"):
    """transformers' config for ``cfg`` (Cohere or Cohere2), with the attention implementation set."""
    import transformers

    d = cfg.to_dict()
    d.pop("architectures", None)
    d.pop("torch_dtype", None)
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    config._attn_implementation = attn
    return config


@torch.no_grad()
def build_hf(ours: HookedCommandR, attn: str = "eager"):
    """transformers' model on meta, then given our parameter tensors (no copy); rotary buffers fresh."""
    import transformers

    cfg = ours.cfg
    cls = transformers.CohereForCausalLM if cfg.model_type == "cohere" else transformers.Cohere2ForCausalLM
    config = hf_config(cfg, attn)
    with torch.device("meta"):
        hf = cls(config)
    state = {ours_to_hf(name): p for name, p in ours.named_parameters()}
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"HF name map mismatch: missing {missing}, unexpected {unexpected}")
    if "lm_head.weight" in missing:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    device = ours.embed.weight.device
    for module in hf.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "compute_default_rope_parameters"):
            if getattr(module, "rope_type", "default") != "default":
                raise RuntimeError(f"rope_type {module.rope_type!r}: only the default rotary is rebuilt here")
            inv_freq, module.attention_scaling = module.compute_default_rope_parameters(module.config)
            module.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
            module.register_buffer("original_inv_freq", inv_freq.clone().to(device), persistent=False)
    left = [n for n, t in list(hf.named_parameters()) + list(hf.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"transformers model still has meta tensors: {left[:6]}")
    hf.generation_config.pad_token_id = cfg.pad_token_id
    return hf.eval()


def share_check(ours: HookedCommandR, hf) -> dict:
    """Every transformers parameter is one of our tensors (same storage): ``{"tensors", "shared"}``."""
    ours_ptrs = {p.data_ptr() for p in ours.parameters()}
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    same_name = all(hf_params[ours_to_hf(n)].data_ptr() == p.data_ptr() for n, p in ours.named_parameters())
    shared = same_name and all(p.data_ptr() in ours_ptrs for p in hf_params.values())
    return {"tensors": len(hf_params), "shared": bool(shared)}


def build_pair(spec: Spec, dtype: torch.dtype, device, seed: int = 0):
    """(ours, hf) sharing one set of weights on ``device``."""
    ours = build_ours(spec.cfg, dtype, device, seed, spec.init_std)
    return ours, build_hf(ours)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every distinct parameter: what one decode step reads (the tied unembedding once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
