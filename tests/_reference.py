"""Build tiny random Cohere checkpoints with transformers (the reference) — test-only helpers."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, logit_scale=0.0625, rope_theta=10000.0,
            use_qk_norm=True, max_position_embeddings=256, pad_token_id=0, bos_token_id=5,
            eos_token_id=6, tie_word_embeddings=True)


def make_hf_checkpoint(path, seed: int = 0, model_type: str = "cohere", **overrides) -> str:
    """Save a random transformers model (non-unit norm weights) to ``path``; return the path."""
    import transformers

    kwargs = {**TINY, **overrides}
    if model_type == "cohere":
        config = transformers.CohereConfig(**kwargs)
        cls = transformers.CohereForCausalLM
    else:
        kwargs.pop("use_qk_norm", None)
        config = transformers.Cohere2Config(**kwargs)
        cls = transformers.Cohere2ForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return os.fspath(path)


def load_reference(path, dtype=torch.float32, attn="eager"):
    import transformers

    cls = transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=dtype, attn_implementation=attn).eval()


def reference_residuals(ref, input_ids, **kwargs):
    """[resid_pre of every layer] + [resid_post of the last layer] from the reference: its hidden_states
    give each layer's input, but their last entry is after the final norm, so the last layer's output
    is taken from the final norm's input."""
    captured = {}
    handle = ref.model.norm.register_forward_pre_hook(lambda mod, args: captured.__setitem__("last", args[0]))
    try:
        out = ref(input_ids, output_hidden_states=True, **kwargs)
    finally:
        handle.remove()
    hs = list(out.hidden_states[:-1]) + [captured["last"]]
    return out.logits, hs
