"""HookedCommandR: Cohere's Command-R family as a hookable einops model, the same function as
transformers' ``CohereForCausalLM`` / ``Cohere2ForCausalLM`` (bit-exact on the explicit attention path).

How Command-R differs from Llama (each is a bit-exactness trap)::

    x ──┬──────────────────────────────────────────────(+)──(+)──> x'      parallel block:
        └─ ln1 (LayerNorm, fp32 incl. weight, no bias) ─┬─ attn ─┘    │     ONE norm feeds both
                                                         └─ mlp ──────┘     branches; no resid_mid

  * LayerNorm (mean-subtracted, not RMSNorm), computed in fp32 including the weight multiply.
  * Rotary embeddings are INTERLEAVED (pairs 2i, 2i+1), tables in fp32 rounded to model dtype,
    applied to fp32-upcast q/k.
  * Optional per-head QK-norm (Command-R+): a LayerNorm over d_head with [head, d_head] weights,
    after the head split and before rotary.
  * Tied unembedding (no lm_head in checkpoints), logits multiplied by ``logit_scale``.
  * cohere2 (Command R7B, Command A): no QK-norm; 3 sliding-window layers with rotary for each
    global layer without any positional encoding.

Axis legend (used in shape comments, hook docs and widgets)::

    batch   sequences in the batch          pos     positions of this forward (queries)
    d_model residual width                  q_pos / k_pos   query / key positions
    head    query heads                     kv_head key/value heads (GQA: head j reads j // group)
    d_head  per-head width                  d_mlp   MLP hidden width        vocab  vocabulary
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention_ops import mask_rows, notify_attention, pattern_rows
from .config import CommandRConfig
from .deferred_results import DEFERRED_HOOKS
from .hook_points import HookedRootModule, HookPoint, begin_forward
from .hook_table import hook_table as build_hook_table
from .input_warnings import warn_past_max_positions
from .loading import init_random, load_pretrained
from .norms import layer_norm_fp32
from .offload import execution_device
from .saving import save_pretrained as save_checkpoint
from .weights import dense_weight, heads_of_o_proj
from .sae_splice import SAEHostMixin
from .tl_gqa import kv_hook, ungroup_kv, ungroup_weight
from .tl_model import Embed, TLAttentionMixin, TLMLPMixin, TLModelMixin, Unembed

_SDPA_GQA = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 5)


class LayerNorm(nn.Module):
    """The block's (and the final) LayerNorm, with hooks on its divisor and its output."""

    def __init__(self, d_model: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))
        self.eps = eps
        self.hook_scale = HookPoint()       # [batch pos 1] float32: sqrt(var + eps)
        self.hook_normalized = HookPoint()  # [batch pos d_model] model dtype, after the weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_normalized(layer_norm_fp32(x, self.weight, self.eps, self.hook_scale))


class QKNorm(nn.Module):
    """Per-head LayerNorm over d_head (Command-R+); weight [head or kv_head, d_head] (repeated per
    query head when keys arrive ungrouped, ``workbench.tl_gqa``)."""

    def __init__(self, n_heads: int, d_head: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n_heads, d_head))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [batch pos head d_head]
        return layer_norm_fp32(x, ungroup_weight(self.weight, x.shape[2]), self.eps)


def rotary_tables(positions: torch.Tensor, d_head: int, theta: float, dtype: torch.dtype):
    """cos, sin [batch|1 pos d_head] for interleaved rotary: fp32 angles rounded to model dtype."""
    inv_freq = _inv_freq(d_head, float(theta)).to(positions.device)
    freqs = positions[..., None].float() * inv_freq             # [batch pos d_head/2]
    emb = torch.repeat_interleave(freqs, 2, dim=-1)             # (f0, f0, f1, f1, ...)
    return emb.cos().to(dtype), emb.sin().to(dtype)


@functools.lru_cache(maxsize=16)
def _inv_freq(d_head: int, theta: float) -> torch.Tensor:
    # On the CPU, as transformers computes its buffer (a GPU pow may differ by an ulp).
    return 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.int64).float() / d_head))


def rotary_operands(cos: torch.Tensor, sin: torch.Tensor):
    """(cos, signed_sin) [batch|1 pos 1 d_head] for ``apply_rotary``, built once per forward.

    signed_sin = (-sin_0, sin_0, -sin_1, sin_1, ...), so rotating is
    ``x * cos + swap_pairs(x) * signed_sin`` — bit-identical to ``rot(x) * sin`` (negation is exact)."""
    sign = torch.tensor([-1.0, 1.0], dtype=sin.dtype, device=sin.device).repeat(sin.shape[-1] // 2)
    return cos[:, :, None, :], (sin * sign)[:, :, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of x [batch pos head d_head] in fp32 (operands from ``rotary_operands``):
    (x_2i, x_2i+1) -> (x_2i cos_i - x_2i+1 sin_i, x_2i+1 cos_i + x_2i sin_i)."""
    dtype = x.dtype
    x = x.float()
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)    # (x_1, x_0, x_3, x_2, ...)
    return ((x * cos) + (swapped * signed_sin)).to(dtype)


class Attention(TLAttentionMixin, nn.Module):
    """Named stages: q/k/v -> q_normed/k_normed -> rot_q/rot_k -> attn_scores -> pattern -> z -> result."""

    def __init__(self, cfg: CommandRConfig, layer: int) -> None:
        super().__init__()
        D, H, K, d = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head
        self.n_heads, self.n_kv_heads, self.d_head, self.group = H, K, d, cfg.group_size
        self.cfg = cfg                                 # read per forward: TL's ungroup_grouped_query_attention
        self.scale = d**-0.5
        self.window = cfg.layer_window(layer)          # None = full causal attention
        self.use_rope = cfg.layer_uses_rope(layer)     # False on cohere2 global (NoPE) layers
        self.use_qk_norm = cfg.use_qk_norm
        self.q_proj = nn.Linear(D, H * d, bias=False)
        self.k_proj = nn.Linear(D, K * d, bias=False)
        self.v_proj = nn.Linear(D, K * d, bias=False)
        self.o_proj = nn.Linear(H * d, D, bias=False)
        self.hook_q = HookPoint()                # [batch pos head d_head]
        self.hook_k = HookPoint()                # [batch pos kv_head d_head]  (head: ungrouped, tl_gqa)
        self.hook_v = HookPoint()                # [batch pos kv_head d_head]  (head: ungrouped, tl_gqa)
        if self.use_qk_norm:
            self.q_norm = QKNorm(H, d, cfg.layer_norm_eps)
            self.k_norm = QKNorm(K, d, cfg.layer_norm_eps)
            self.hook_q_normed = HookPoint()     # [batch pos head d_head]
            self.hook_k_normed = HookPoint()     # [batch pos kv_head d_head]
        if self.use_rope:
            self.hook_rot_q = HookPoint()        # [batch pos head d_head]
            self.hook_rot_k = HookPoint()        # [batch pos kv_head d_head]  (what the KV cache stores)
        self.hook_attn_scores = HookPoint()      # [batch head q_pos k_pos] scaled + masked, model dtype
        self.hook_pattern = HookPoint()          # [batch head q_pos k_pos] softmax, model dtype
        self.hook_z = HookPoint()                # [batch pos head d_head]
        self.hook_result = HookPoint()           # [batch pos head d_model] per-head o_proj output

    @property
    def W_O(self) -> torch.Tensor:
        """[head d_head d_model] view of o_proj (dequantized if bitsandbytes packed it): head j writes z_j @ W_O[j]."""
        return heads_of_o_proj(dense_weight(self.o_proj), self.n_heads)

    def needs_explicit(self) -> bool:
        return self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks

    def forward(self, h: torch.Tensor, rope, masks, kv_cache=None, layer: int = 0, explicit: bool = False):
        H = self.n_heads
        q = self.hook_q(rearrange(self.q_proj(h), "b s (h d) -> b s h d", d=self.d_head))
        k = rearrange(self.k_proj(h), "b s (h d) -> b s h d", d=self.d_head)    # [batch pos kv_head d_head]
        v = rearrange(self.v_proj(h), "b s (h d) -> b s h d", d=self.d_head)
        if self.group > 1 and self.cfg.ungroup_grouped_query_attention:       # TL's switch: one copy per head
            k, v = ungroup_kv(k, self.group), ungroup_kv(v, self.group)         # [batch pos head d_head]
        k, v = kv_hook(self.hook_k, k, H), kv_hook(self.hook_v, v, H)
        if self.use_qk_norm:
            q = self.hook_q_normed(self.q_norm(q))
            k = kv_hook(self.hook_k_normed, self.k_norm(k), H)
        if self.use_rope:
            cos, sin = rope
            q = self.hook_rot_q(apply_rotary(q, cos, sin))
            k = kv_hook(self.hook_rot_k, apply_rotary(k, cos, sin), H)
        q = rearrange(q, "b s h d -> b h s d")
        k = rearrange(k, "b s h d -> b h s d")
        v = rearrange(v, "b s h d -> b h s d")
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)          # [batch kv_head k_pos d_head]
        notify_attention(self, layer, q, k, masks)       # no-op unless observe_attention() is active
        mask, is_causal = masks.get(self.window, k.shape[-2], q.device)
        if explicit or self.needs_explicit():
            z = self._explicit(q, k, v, mask, masks)
        else:
            z = self._fused(q, k, v, mask, is_causal)
        z = self.hook_z(rearrange(z, "b h s d -> b s h d"))   # [batch pos head d_head]
        if self.hook_result.has_hooks:
            return self.hook_result(self._per_head_result(z)).sum(dim=2)
        return self.o_proj(rearrange(z, "b s h d -> b s (h d)"))

    def can_defer_result(self) -> bool:
        """Per-head results can be recomputed after the forward from z and o_proj's weight."""
        return type(self.o_proj) is nn.Linear

    def _per_head_result(self, z: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[batch pos head d_model]: each head's z through its slice of o_proj (``weight`` [d_model
        (head d_head)] defaults to o_proj's; a cache passes the one it captured during the forward)."""
        weight = self.o_proj.weight if weight is None else weight
        if type(self.o_proj) is nn.Linear and weight.device.type != "meta":
            W_O = rearrange(weight, "m (h d) -> h d m", h=self.n_heads)
            return torch.einsum("bshd,hdm->bshm", z, W_O)
        # Quantized (bitsandbytes: packed weight) or offloaded (accelerate: weight only present
        # inside o_proj's own forward) o_proj: run the module itself on a block-diagonal input in
        # which row h holds only head h's z.
        eye = torch.eye(self.n_heads, dtype=z.dtype, device=z.device)
        blocks = torch.einsum("bshd,hg->bshgd", z, eye)
        return self.o_proj(rearrange(blocks, "b s h g d -> b s h (g d)"))

    def _explicit(self, q, k, v, mask, masks):
        # Bits depend on memory layout as well as values: BLAS picks its kernel (and so its
        # summation order) from the operands' strides. Hand ``eager_attention`` exactly what
        # transformers hands its ``eager_attention_forward``: keys and values contiguous
        # [batch kv_head k_pos d_head] (its KV cache concatenates), and a single rotated query row
        # with standard strides (its rotary math on a [batch head 1 d_head] view yields them).
        # Longer queries, and queries of layers without rotary (cohere2's global layers), keep the
        # [batch pos head d_head] storage order of the projection, as in the reference.
        if q.shape[2] == 1 and self.use_rope:
            q = standard_strides(q)
        if mask is None:                              # rows per query block, not [q_pos k_pos] at once
            mask = functools.partial(masks.rows, self.window, k.shape[-2], device=q.device)
        return eager_attention(self, q, standard_strides(k), standard_strides(v), mask)

    def _fused(self, q, k, v, mask, is_causal):
        group = q.shape[1] // k.shape[1]                 # 1 when keys/values arrive ungrouped
        if group > 1:
            if _SDPA_GQA:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                      scale=self.scale, enable_gqa=True)
            k, v = repeat_kv(k, group), repeat_kv(v, group)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=self.scale)


def eager_attention(attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    mask: torch.Tensor) -> torch.Tensor:
    """The explicit attention stages, op for op as transformers' ``eager_attention_forward``.

    query [batch head q_pos d_head], key/value [batch kv_head k_pos d_head], mask additive
    [batch|1 1 q_pos k_pos] or a function (r0, r1) -> its rows r0..r1-1 -> z [batch head q_pos d_head].
    ``attn`` supplies the scale and the ``hook_attn_scores``/``hook_pattern`` points.
    Callers pass the operands in the reference's layouts (tests/test_layout.py compares shapes and
    strides with the reference). Unless the scores are hooked, the pattern is computed in query
    blocks into one buffer (``attention_ops.pattern_rows``: the same ops and bits, ~1x its bytes)."""
    group = query.shape[1] // key.shape[1]            # 1 when keys/values arrive ungrouped (tl_gqa)
    key = repeat_kv(key, group)                       # [batch head k_pos d_head]
    value = repeat_kv(value, group)
    if attn.hook_attn_scores.has_hooks:               # the full scores only when something reads them
        mask = mask if isinstance(mask, torch.Tensor) else mask(0, query.shape[2])
        scores = torch.matmul(query, key.transpose(2, 3)) * attn.scale
        scores = attn.hook_attn_scores(scores + mask)     # [batch head q_pos k_pos]
        pattern = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    else:                                             # the same ops per query block: ~1x the pattern's bytes
        rows = (lambda r0, r1: mask[:, :, r0:r1]) if isinstance(mask, torch.Tensor) else mask
        pattern = pattern_rows(query, key, attn.scale, rows)
    pattern = attn.hook_pattern(pattern)              # [batch head q_pos k_pos]
    return torch.matmul(pattern, value)               # [batch head q_pos d_head]


def standard_strides(x: torch.Tensor) -> torch.Tensor:
    """``x`` with row-major strides, also on size-1 axes (which ``.contiguous()`` leaves as they are
    and which still steer some kernels): what a freshly allocated tensor, like a concatenation, has."""
    stride, expected = x.stride(), []
    step = 1
    for size in reversed(x.shape):
        expected.append(step)
        step *= max(size, 1)
    if stride == tuple(reversed(expected)):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[batch kv_head k_pos d_head] -> [batch (kv_head group) k_pos d_head]; consecutive heads share."""
    if group == 1:
        return x
    b, kh, t, d = x.shape
    return x[:, :, None].expand(b, kh, group, t, d).reshape(b, kh * group, t, d)


class MLP(TLMLPMixin, nn.Module):
    """SwiGLU: down(silu(gate(h)) * up(h))."""

    def __init__(self, cfg: CommandRConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)
        self.hook_pre = HookPoint()         # [batch pos d_mlp] gate pre-activation
        self.hook_pre_linear = HookPoint()  # [batch pos d_mlp] up projection
        self.hook_post = HookPoint()        # [batch pos d_mlp] silu(gate) * up

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate = self.hook_pre(self.gate_proj(h))
        up = self.hook_pre_linear(self.up_proj(h))
        post = self.hook_post(F.silu(gate) * up)
        return self.down_proj(post)


class Block(nn.Module):
    """x' = (x + attn(ln1(x))) + mlp(ln1(x)). No resid_mid, no ln2: the block is parallel."""

    def __init__(self, cfg: CommandRConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        # declared in forward order, so hook_dict and the hook table list them that way
        self.hook_resid_pre = HookPoint()   # [batch pos d_model]
        self.ln1 = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.attn = Attention(cfg, layer)
        self.hook_attn_out = HookPoint()    # [batch pos d_model]
        self.mlp = MLP(cfg)
        self.hook_mlp_out = HookPoint()     # [batch pos d_model]
        self.hook_resid_post = HookPoint()  # [batch pos d_model]

    def forward(self, x, rope, masks, kv_cache=None, explicit: bool = False):
        x = self.hook_resid_pre(x)
        h = self.ln1(x)
        attn_out = self.hook_attn_out(self.attn(h, rope, masks, kv_cache, self.layer, explicit))
        mlp_out = self.hook_mlp_out(self.mlp(h))
        return self.hook_resid_post(x + attn_out + mlp_out)


class Masks:
    """Additive attention masks for one forward, built once per (window, key length).

    A key at cache index k is visible to the query at cache index q iff k <= q, k > q - window
    (sliding layers) and the attention_mask marks it real. Returns (mask or None, is_causal): the
    fused path gets None + is_causal when plain causal attention over all keys suffices.
    """

    def __init__(self, attention_mask: Optional[torch.Tensor], past_len: int, n_new: int,
                 dtype: torch.dtype, device) -> None:
        self.past_len, self.n_new, self.dtype, self.device = past_len, n_new, dtype, device
        self.pad = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.bool()
        self._cache: dict = {}

    def get(self, window: Optional[int], n_keys: int, device=None):
        window_cuts = window is not None and self.past_len + self.n_new > window
        if self.pad is None and not window_cuts:
            if self.n_new == 1:
                return None, False
            if n_keys == self.n_new:
                return None, True
        return self.dense(window, n_keys, device), False

    def dense(self, window, n_keys, device=None) -> torch.Tensor:
        """[batch|1 1 q_pos k_pos] with 0 where visible and finfo.min elsewhere.

        Keys are the last ``n_keys`` cache indices: the KV cache always returns a contiguous suffix
        (a sliding-window layer keeps only its last window - 1 keys)."""
        device = torch.device(device if device is not None else self.device)
        key = (window, n_keys, device)
        if key not in self._cache:
            self._cache[key] = self.rows(window, n_keys, 0, self.n_new, device)
        return self._cache[key]

    def rows(self, window, n_keys, r0: int, r1: int, device=None) -> torch.Tensor:
        """Rows r0..r1-1 of ``dense`` [batch|1 1 r1-r0 k_pos], built without the full mask."""
        device = torch.device(device if device is not None else self.device)
        return mask_rows(self.past_len, self.n_new, self.pad, self.dtype, device, window, n_keys,
                         torch.arange(r0, r1, device=device))


class HookedCommandR(TLModelMixin, SAEHostMixin, HookedRootModule):
    """Command-R with a named hook at every stage.

    Example::

        model = HookedCommandR.from_pretrained("command-r-tiny")
        logits, cache = model.run_with_cache(tokens)
        cache["pattern", 0].shape        # [batch head q_pos k_pos]
    """

    deferred_hooks = DEFERRED_HOOKS               # per-head results a cache computes after the forward

    def __init__(self, cfg: CommandRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.d_model)
        self.hook_embed = HookPoint()              # [batch pos d_model]
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.ln_final = LayerNorm(cfg.d_model, cfg.layer_norm_eps)
        self.unembed = Unembed(cfg.d_model, cfg.vocab_size, cfg.logit_scale)
        if cfg.tie_word_embeddings:
            self.unembed.weight = self.embed.weight
        self.hook_logits_unscaled = HookPoint()    # [batch pos vocab] before x logit_scale
        self.hook_logits = HookPoint()             # [batch pos vocab]
        self.attn_impl = "auto"                    # "auto" | "explicit" | "fused"
        self.setup_hooks()

    # ------------------------------------------------------------------ computation
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, kv_cache=None, logits_to_keep: int = 0, *,
                return_type: Optional[str] = "logits", loss_per_token: bool = False, prepend_bos: Optional[bool] = None,
                padding_side: Optional[str] = None, stop_at_layer: Optional[int] = None):
        """input_ids [batch pos] -> logits [batch pos vocab].

        ``attention_mask`` [batch past+pos] (1 = real token) masks keys; ``position_ids`` default to
        ``arange`` after the cache (as transformers' plain forward; ``generate`` derives them from
        the mask for left padding). ``kv_cache`` is a ``workbench.kv_cache.KVCache``.
        ``logits_to_keep`` > 0 unembeds only the last that many positions, as transformers (its
        ``generate`` uses 1: same logits bit for bit, no [pos vocab] tensor for a long prompt);
        ``ln_final`` hooks still see every position, ``hook_logits*`` only the kept ones.

        TransformerLens' arguments (strings in, ``return_type``, ``loss_per_token``, ``prepend_bos``,
        ``padding_side``, ``stop_at_layer``) are documented in ``workbench.tl_model``.
        """
        call = self.prepare_forward(input_ids, attention_mask, position_ids, kv_cache, logits_to_keep, return_type,
                                    loss_per_token, prepend_bos, padding_side, stop_at_layer)
        input_ids, attention_mask, position_ids = call.input_ids, call.attention_mask, call.position_ids  # TL args
        past_len = kv_cache.seen if kv_cache is not None else 0
        self._check_inputs(input_ids, attention_mask, position_ids, past_len)
        n_new = input_ids.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + n_new, device=input_ids.device)[None]
        begin_forward(position_ids, past_len)     # hook.ctx of this forward (per call, per thread)
        x = self.hook_embed(self.embed(input_ids))
        masks = Masks(attention_mask, past_len, n_new, x.dtype, x.device)
        rope = rotary_operands(*rotary_tables(position_ids.to(x.device), self.cfg.d_head, self.cfg.rope_theta, x.dtype))
        explicit = self.attn_impl == "explicit"
        for block in self.blocks[:call.stop_at_layer]:      # all blocks unless TL's stop_at_layer
            x = block(x, rope, masks, kv_cache, explicit)
        if call.stop_at_layer is not None:
            return x                                        # the residual entering block stop_at_layer
        if kv_cache is not None:
            kv_cache.advance(n_new, input_ids)      # hardA: the ids, so generate can check a prefix
        x = self.ln_final(x)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        logits = self.hook_logits_unscaled(self.unembed(x, scaled=False))
        logits = self.hook_logits(logits * self.cfg.logit_scale)
        return self.finish_forward(call, logits)   # TL's return_type (tl_model.TLModelMixin.finish_forward)

    def _check_inputs(self, input_ids, attention_mask, position_ids, past_len: int) -> None:
        """Refuse bad inputs before anything runs (no hook fires, the cache is untouched)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids: expected an integer tensor of shape [batch, pos], got {got}")
        batch, n_new = input_ids.shape
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (batch, past_len + n_new):
                got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
                raise ValueError(f"attention_mask: expected a tensor of shape {(batch, past_len + n_new)} "
                                 f"[batch, past + pos], got {got}")
        if position_ids is not None:
            if (not isinstance(position_ids, torch.Tensor) or position_ids.dim() != 2
                    or position_ids.shape[1] != n_new or position_ids.shape[0] not in (1, batch)):
                got = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
                raise ValueError(f"position_ids: expected a tensor of shape [batch or 1, pos] = [{batch} or 1, {n_new}], got {got}")
        # hardB (issue 15.5): id range and last position read back together, in one device sync
        stats = [input_ids.min(), input_ids.max()] if input_ids.numel() else []
        if stats and position_ids is not None:
            stats.append(position_ids.max().to(input_ids.device, input_ids.dtype))
        values = torch.stack(stats).tolist() if stats else []
        if values and (values[0] < 0 or values[1] >= self.cfg.vocab_size):
            raise ValueError(f"input_ids: ids must be in [0, vocab_size={self.cfg.vocab_size}), got "
                             f"min {values[0]}, max {values[1]}")
        last = values[2] if len(values) == 3 else past_len + n_new - 1
        warn_past_max_positions(last, self.cfg.max_position_embeddings)

    # ------------------------------------------------------------------ helpers
    @property
    def attn_impl(self) -> str:
        """"auto" (fused unless a layer's scores/pattern are hooked), "explicit" (bit-exact) or "fused"."""
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, value: str) -> None:
        if value not in ("auto", "explicit", "fused"):
            raise ValueError(f"attn_impl: expected 'auto', 'explicit' or 'fused', got {value!r}")
        self._attn_impl = value

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where inputs go: the embedding's (execution) device, also under accelerate offload."""
        return execution_device(self)

    def hook_table(self, batch: int = 1, pos: int = 8, k_pos: Optional[int] = None) -> list[dict]:
        """Every hook name with its shape and dtype for a [batch, pos] input, without running."""
        return build_hook_table(self, batch, pos, k_pos)

    @classmethod
    def from_config(cls, cfg: CommandRConfig, dtype=None, device=None, seed: Optional[int] = None):
        """A randomly initialised model (normal(0, 0.02) weights, unit norms) for tests and planning."""
        return init_random(cls(cfg) if device != "meta" else _on_meta(cls, cfg), dtype=dtype, seed=seed)

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs) -> "HookedCommandR":
        """Load a checkpoint folder in the Hugging Face layout (see ``workbench.loading``)."""
        return load_pretrained(cls, path, *args, **kwargs)

    def save_pretrained(self, path, **kwargs) -> None:
        save_checkpoint(self, path, **kwargs)

    def generate(self, input_ids, *args, **kwargs) -> torch.Tensor:
        """``workbench.generation.generate``; also takes strings (text out) and TL's arguments (tl_model)."""
        return self.generate_tl(input_ids, *args, **kwargs)


def _on_meta(cls, cfg):
    with torch.device("meta"):
        return cls(cfg)
