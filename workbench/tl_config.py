"""TransformerLens' config field names on CommandRConfig (a mixin; read-only views of our fields).

``transformer_lens.patching``, ``utils`` and users' TL code read ``cfg.d_vocab``, ``cfg.n_ctx``,
``cfg.device``, ``cfg.n_key_value_heads``, ... This mixin answers them from CommandRConfig's own
fields, with Command-R's real architecture: gated SiLU MLP, LayerNorm without bias, rotary on
adjacent pairs, a parallel attention+MLP block, no biases anywhere.

``device`` and ``dtype`` describe the model the config belongs to: ``HookedCommandR`` keeps them
current when it is moved or cast (before that: ``"cpu"`` and the checkpoint's dtype or float32).

Example::

    cfg = CommandRConfig.from_preset("command-r-plus")
    cfg.d_vocab, cfg.n_ctx, cfg.parallel_attn_mlp, cfg.positional_embedding_type   # 256000 8192 True 'rotary'
"""

from __future__ import annotations

import torch

from .tl_gqa import check_flag


class TLConfigMixin:
    """TransformerLens' ``HookedTransformerConfig`` names, derived from CommandRConfig's fields."""

    # constant facts of the Command-R architecture, in TL's vocabulary
    act_fn = "silu"
    gated_mlp = True
    normalization_type = "LN"              # LayerNorm (mean-subtracted), weight only, no bias
    positional_embedding_type = "rotary"
    rotary_adjacent_pairs = True           # interleaved pairs (2i, 2i+1), not GPT-NeoX halves
    parallel_attn_mlp = True
    attention_dir = "causal"
    attn_only = False
    final_rms = False
    original_architecture_name = "CohereForCausalLM"
    default_prepend_bos = True
    tokenizer_prepends_bos = True
    default_padding_side = "right"
    use_attn_result = True                 # hook_result always exists (computed only when listened to)
    use_split_qkv_input = False
    use_hook_mlp_in = False
    use_attn_in = False
    use_hook_tokens = False
    use_attn_scale = True
    use_local_attn = False
    output_logits_soft_cap = -1.0
    n_devices = 1
    seed = None
    init_weights = False

    @property
    def d_vocab(self) -> int:
        return self.vocab_size

    @property
    def d_vocab_out(self) -> int:
        return self.vocab_size

    @property
    def n_ctx(self) -> int:
        return self.max_position_embeddings

    @property
    def n_key_value_heads(self) -> int:
        """Key/value heads as ``hook_k``/``hook_v`` carry them: ``n_kv_heads``, or ``n_heads`` once
        ``ungroup_grouped_query_attention`` is on (so TL code that sizes a k/v sweep from it, like
        ``transformer_lens.patching`` 4.x, covers every per-head copy the hooks expose)."""
        return self.n_heads if self.ungroup_grouped_query_attention else self.n_kv_heads

    @property
    def eps(self) -> float:
        return self.layer_norm_eps

    @property
    def rotary_dim(self) -> int:
        return self.d_head

    @property
    def rotary_base(self) -> float:
        return self.rope_theta

    @property
    def attn_scale(self) -> float:
        return float(self.d_head) ** 0.5

    @property
    def original_architecture(self) -> str:
        return "CohereForCausalLM" if self.model_type == "cohere" else "Cohere2ForCausalLM"

    @property
    def model_name(self) -> str:
        return self.__dict__.get("_tl_model_name", self.model_type)

    @model_name.setter
    def model_name(self, value: str) -> None:
        self.__dict__["_tl_model_name"] = value

    @property
    def window_size(self):
        return self.sliding_window

    @property
    def attn_types(self) -> list:
        """Per layer ``"global"`` or ``"local"`` (sliding window), as TL spells it."""
        return ["local" if t == "sliding_attention" else "global" for t in self.layer_types]

    @property
    def device(self) -> str:
        return self.__dict__.get("_tl_device", "cpu")

    @device.setter
    def device(self, value) -> None:
        self.__dict__["_tl_device"] = str(value)

    @property
    def dtype(self) -> torch.dtype:
        return self.__dict__.get("_tl_dtype") or self.torch_dtype or torch.float32

    @dtype.setter
    def dtype(self, value: torch.dtype) -> None:
        self.__dict__["_tl_dtype"] = value

    @property
    def ungroup_grouped_query_attention(self) -> bool:
        """TL's switch (default False): ``hook_k``/``hook_v`` carry one copy per query head (see
        ``workbench.tl_gqa``). A runtime setting, not saved with the checkpoint's config."""
        return self.__dict__.get("_tl_ungroup_gqa", False)

    @ungroup_grouped_query_attention.setter
    def ungroup_grouped_query_attention(self, value: bool) -> None:
        self.__dict__["_tl_ungroup_gqa"] = check_flag(value)
