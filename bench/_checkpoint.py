"""The random checkpoint every bench measures: a transformers ``CohereForCausalLM`` saved to a folder."""

from __future__ import annotations

import torch


def build_checkpoint(path: str, vocab_size: int, hidden_size: int, intermediate_size: int,
                     num_hidden_layers: int, num_attention_heads: int, num_key_value_heads: int,
                     use_qk_norm: bool = True, max_position_embeddings: int = 512) -> str:
    """Save a random model (transformers' own init, non-unit norm weights: no accidental shortcuts)."""
    import transformers

    config = transformers.CohereConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads, use_qk_norm=use_qk_norm, logit_scale=0.0625,
        rope_theta=10000.0, max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.CohereForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    transformers.utils.logging.disable_progress_bar()
    model.save_pretrained(path)
    return path


def build_from_args(path: str, args) -> str:
    """``build_checkpoint`` from the benches' shared argparse fields."""
    return build_checkpoint(path, vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.d_mlp,
                            num_hidden_layers=args.layers, num_attention_heads=args.heads,
                            num_key_value_heads=args.kv_heads, use_qk_norm=not args.no_qk_norm,
                            max_position_embeddings=max(512, getattr(args, "pos", 0) or 0))
