"""The TransformerLens surface of HookedCommandR (mixins; the computation stays in model.py).

TransformerLens code runs unchanged on HookedCommandR: tokenization helpers (``to_tokens``,
``to_str_tokens``, ``to_string``, ``to_single_token``, ``get_token_position``), ``model.tokenizer``
(loaded from the checkpoint folder on first use), string inputs to the forward / ``run_with_cache``
/ ``run_with_hooks`` / ``generate``, ``return_type`` ("logits", "loss", "both", None),
``loss_per_token``, ``prepend_bos``, ``padding_side``, ``stop_at_layer``, ``remove_batch_dim``,
head-major weights stacked ``[layer head ...]`` (``W_Q``, ``W_K``, ``W_V``, ``W_O``, ``b_*``,
``W_in``/``W_gate``/``W_out``), ``OV``/``QK`` as ``FactoredMatrix``, ``add_hook``, ``mod_dict``,
``setup()``.

Command-R specifics a TL user must know:

* ``W_U`` INCLUDES ``logit_scale`` (``ln_final(resid) @ model.W_U`` is the model's logits, as TL's
  arithmetic assumes); the stored tied weight is ``model.W_U_raw``.
* GQA: ``W_K``/``W_V`` are expanded to one slice per query head (TL's convention, so ``QK``/``OV``
  are per head); the stored kv-head weights are ``W_K_kv``/``W_V_kv`` ``[layer kv_head d_model d_head]``.
  ``hook_k``/``hook_v`` carry kv heads unless ``set_ungroup_grouped_query_attention(True)`` (``tl_gqa``).
* ``QK`` ignores rotary and the per-head QK-norm (Command-R+), as TL's ignores rotary.
* No biases anywhere: every ``b_*`` is zeros of TL's shape. No ``W_pos`` (rotary positions).

Example::

    model = HookedCommandR.from_pretrained("command-r-tiny")
    tokens = model.to_tokens("The capital of France is")            # [1 pos], BOS first
    loss = model(tokens, return_type="loss")
    model.to_str_tokens("The capital of France is")                 # ['<BOS_TOKEN>', 'The', ' capital', ...]
    resid = model(tokens, stop_at_layer=2)                          # == blocks.2.hook_resid_pre
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from .activation_cache import ActivationCache
from .generation import generate as _generate_ids
from .hook_points import HookPoint
from .input_warnings import warn_if_padded
from .tl_factored import FactoredMatrix
from .hook_names import get_act_name
from .tl_processing import TLProcessingMixin
from .tl_tokens import TLTokensMixin

RETURN_TYPES = ("logits", "loss", "both", None)
BRIDGE_BLOCK_ALIAS = re.compile(r"^blocks\.(\d+)\.hook_(in|out)$")


def circuit_qk(owner) -> FactoredMatrix:
    """``[... head d_model d_model]`` = W_Q @ W_K^T (no rotary, no QK-norm), for one attention layer
    (``[head ...]``) or the whole model (``[layer head ...]``)."""
    return FactoredMatrix(owner.W_Q, owner.W_K.transpose(-1, -2))


def circuit_ov(owner) -> FactoredMatrix:
    """``[... head d_model d_model]`` = W_V @ W_O, per layer or stacked over layers (see ``circuit_qk``)."""
    return FactoredMatrix(owner.W_V, owner.W_O)


class TLAttentionMixin:
    """Head-major weight views on an ``Attention`` module (TL's ``block.attn.W_Q`` etc.)."""

    @property
    def W_Q(self) -> torch.Tensor:
        return rearrange(self.q_proj.weight, "(h d) m -> h m d", h=self.n_heads)       # [head d_model d_head]

    @property
    def W_K_kv(self) -> torch.Tensor:
        return rearrange(self.k_proj.weight, "(k d) m -> k m d", k=self.n_kv_heads)    # [kv_head d_model d_head]

    @property
    def W_V_kv(self) -> torch.Tensor:
        return rearrange(self.v_proj.weight, "(k d) m -> k m d", k=self.n_kv_heads)

    @property
    def W_K(self) -> torch.Tensor:
        """[head d_model d_head]: each query head's key weight (kv head j // group, repeated)."""
        return repeat(self.W_K_kv, "k m d -> (k g) m d", g=self.group)

    @property
    def W_V(self) -> torch.Tensor:
        return repeat(self.W_V_kv, "k m d -> (k g) m d", g=self.group)

    @property
    def b_Q(self) -> torch.Tensor:
        return self.q_proj.weight.new_zeros(self.n_heads, self.d_head)

    b_K = b_V = b_Q

    @property
    def b_O(self) -> torch.Tensor:
        return self.o_proj.weight.new_zeros(self.o_proj.weight.shape[0])

    QK = property(circuit_qk)
    OV = property(circuit_ov)


class TLMLPMixin:
    """TL's names for the SwiGLU MLP: ``post = silu(x @ W_gate) * (x @ W_in)``, ``out = post @ W_out``."""

    @property
    def W_in(self) -> torch.Tensor:
        return self.up_proj.weight.T               # [d_model d_mlp]

    @property
    def W_gate(self) -> torch.Tensor:
        return self.gate_proj.weight.T             # [d_model d_mlp]

    @property
    def W_out(self) -> torch.Tensor:
        return self.down_proj.weight.T             # [d_mlp d_model]

    @property
    def b_in(self) -> torch.Tensor:
        return self.up_proj.weight.new_zeros(self.up_proj.weight.shape[0])

    @property
    def b_out(self) -> torch.Tensor:
        return self.down_proj.weight.new_zeros(self.down_proj.weight.shape[0])


class Embed(nn.Embedding):
    """The token embedding, with TL's ``model.embed.W_E`` view ``[vocab d_model]``."""

    @property
    def W_E(self) -> torch.Tensor:
        return self.weight


class Unembed(nn.Linear):
    """Tied unembedding: ``model.unembed(ln_final(x))`` is the logits, ``logit_scale`` included (as TL code
    expects); the model's forward takes ``scaled=False`` and scales after ``hook_logits_unscaled``.
    ``W_U`` ``[d_model vocab]`` includes ``logit_scale`` too (``W_U_raw``: the stored weight)."""

    def __init__(self, d_model: int, vocab_size: int, logit_scale: float) -> None:
        super().__init__(d_model, vocab_size, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: torch.Tensor, scaled: bool = True) -> torch.Tensor:
        logits = super().forward(x)                # [batch pos vocab]
        return logits * self.logit_scale if scaled else logits

    @property
    def W_U(self) -> torch.Tensor:
        return self.weight.T * self.logit_scale

    @property
    def W_U_raw(self) -> torch.Tensor:
        return self.weight.T

    @property
    def b_U(self) -> torch.Tensor:
        return self.weight.new_zeros(self.weight.shape[0])


@dataclass
class ForwardCall:
    """One forward's inputs after TL-style preparation, and how to finish its output."""

    input_ids: torch.Tensor
    attention_mask: Optional[torch.Tensor]
    position_ids: Optional[torch.Tensor]
    return_type: Optional[str] = "logits"
    loss_per_token: bool = False
    stop_at_layer: Optional[int] = None


class TLModelMixin(TLTokensMixin, TLProcessingMixin):
    """TransformerLens' HookedTransformer API on HookedCommandR (see the module docstring)."""

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """``W_U`` columns (logit_scale included) of ``tokens`` (a str, an int or ids): ``[... d_model]``."""
        if isinstance(tokens, str):
            tokens = self.to_single_token(tokens)
        ids = torch.as_tensor(tokens, dtype=torch.long, device=self.W_U.device)
        return self.W_U[:, ids].movedim(0, -1)

    # ------------------------------------------------------------------ forward arguments
    def prepare_forward(self, input_ids, attention_mask, position_ids, kv_cache, logits_to_keep, return_type,
                        loss_per_token, prepend_bos, padding_side, stop_at_layer) -> ForwardCall:
        """TL-style forward arguments -> the tensors the computation takes (called first in forward)."""
        if isinstance(attention_mask, str):          # TL's positional return_type: model(tokens, "loss")
            attention_mask, return_type = None, attention_mask
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type: expected one of {RETURN_TYPES}, got {return_type!r}")
        if stop_at_layer is not None:
            n = self.cfg.n_layers
            if not isinstance(stop_at_layer, int) or not -n <= stop_at_layer <= n:
                raise ValueError(f"stop_at_layer: expected an int in [-{n}, {n}], got {stop_at_layer!r}")
            if kv_cache is not None:
                raise ValueError("stop_at_layer: cannot be combined with kv_cache (the cache would be left half-filled)")
            stop_at_layer %= n + 1 if stop_at_layer >= 0 else n
        if return_type in ("loss", "both") and logits_to_keep:
            raise ValueError("return_type='loss' needs every position's logits; leave logits_to_keep at 0")
        if isinstance(input_ids, str) or (isinstance(input_ids, (list, tuple)) and input_ids
                                           and all(isinstance(t, str) for t in input_ids)):
            if attention_mask is not None or kv_cache is not None:
                raise ValueError("string input: the model builds the attention_mask itself and cannot extend a kv_cache; "
                                 "pass token ids for those")
            texts = [input_ids] if isinstance(input_ids, str) else list(input_ids)
            input_ids, mask = self.tokenize_batch(texts, prepend_bos, padding_side)
            input_ids = input_ids.to(self.device)
            if not bool(mask.all()):
                attention_mask = mask.to(self.device)
                if position_ids is None:
                    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        else:
            if isinstance(input_ids, (list, tuple)):
                input_ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
            if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
                input_ids = input_ids[None]
            if kv_cache is None and isinstance(input_ids, torch.Tensor):
                warn_if_padded(input_ids, attention_mask, self.cfg.pad_token_id, stacklevel=5)
        return ForwardCall(input_ids, attention_mask, position_ids, return_type, bool(loss_per_token), stop_at_layer)

    def finish_forward(self, call: ForwardCall, logits: torch.Tensor):
        """The forward's return value for ``call.return_type`` (called last in forward)."""
        if call.return_type is None:
            return None
        if call.return_type == "logits":
            return logits
        loss = self.loss_fn(logits, call.input_ids, call.attention_mask, per_token=call.loss_per_token)
        return loss if call.return_type == "loss" else (logits, loss)

    def loss_fn(self, logits: torch.Tensor, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                per_token: bool = False) -> torch.Tensor:
        """Next-token cross-entropy (float32): mean over predicted tokens, or ``[batch pos-1]`` with
        ``per_token``. Positions whose input or target is padding (``attention_mask`` 0) are left out
        of the mean (and are 0 per token)."""
        log_probs = logits[:, :-1].float().log_softmax(-1)                           # [batch pos-1 vocab]
        target = tokens[:, 1:].to(log_probs.device)
        per = -log_probs.gather(-1, target[..., None])[..., 0]                      # [batch pos-1]
        if attention_mask is not None:
            m = (attention_mask[:, -tokens.shape[1]:][:, :-1].bool() & attention_mask[:, -tokens.shape[1]:][:, 1:].bool())
            per = per * m.to(per.device)
            return per if per_token else per.sum() / m.sum().clamp(min=1)
        return per if per_token else per.mean()

    # ------------------------------------------------------------------ stacked weights
    def _stack(self, fn) -> torch.Tensor:
        return torch.stack([fn(block) for block in self.blocks])

    W_Q = property(lambda self: self._stack(lambda b: b.attn.W_Q), doc="[layer head d_model d_head]")
    W_K = property(lambda self: self._stack(lambda b: b.attn.W_K), doc="[layer head d_model d_head] (kv heads repeated)")
    W_V = property(lambda self: self._stack(lambda b: b.attn.W_V), doc="[layer head d_model d_head] (kv heads repeated)")
    W_O = property(lambda self: self._stack(lambda b: b.attn.W_O), doc="[layer head d_head d_model]")
    W_K_kv = property(lambda self: self._stack(lambda b: b.attn.W_K_kv), doc="[layer kv_head d_model d_head]")
    W_V_kv = property(lambda self: self._stack(lambda b: b.attn.W_V_kv), doc="[layer kv_head d_model d_head]")
    b_Q = property(lambda self: self._stack(lambda b: b.attn.b_Q), doc="[layer head d_head] zeros")
    b_K = property(lambda self: self._stack(lambda b: b.attn.b_K), doc="[layer head d_head] zeros")
    b_V = property(lambda self: self._stack(lambda b: b.attn.b_V), doc="[layer head d_head] zeros")
    b_O = property(lambda self: self._stack(lambda b: b.attn.b_O), doc="[layer d_model] zeros")
    W_in = property(lambda self: self._stack(lambda b: b.mlp.W_in), doc="[layer d_model d_mlp] (up_proj)")
    W_gate = property(lambda self: self._stack(lambda b: b.mlp.W_gate), doc="[layer d_model d_mlp] (gate_proj)")
    W_out = property(lambda self: self._stack(lambda b: b.mlp.W_out), doc="[layer d_mlp d_model] (down_proj)")
    b_in = property(lambda self: self._stack(lambda b: b.mlp.b_in), doc="[layer d_mlp] zeros")
    b_out = property(lambda self: self._stack(lambda b: b.mlp.b_out), doc="[layer d_model] zeros")

    @property
    def W_E(self) -> torch.Tensor:
        return self.embed.weight                   # [vocab d_model]

    @property
    def W_U(self) -> torch.Tensor:
        """[d_model vocab] INCLUDING logit_scale: ``ln_final(resid) @ W_U`` is the model's logits
        (TransformerLens' arithmetic). The stored (tied) weight is ``W_U_raw``."""
        return self.unembed.weight.T * self.cfg.logit_scale

    @property
    def W_U_raw(self) -> torch.Tensor:
        """[d_model vocab] the unembedding weight as stored (tied to W_E), without logit_scale."""
        return self.unembed.weight.T

    @property
    def b_U(self) -> torch.Tensor:
        return self.embed.weight.new_zeros(self.cfg.vocab_size)          # [vocab] zeros: no unembedding bias

    QK = property(circuit_qk)    # [layer head d_model d_model]
    OV = property(circuit_ov)    # [layer head d_model d_model]

    def all_head_labels(self) -> list:
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    # ------------------------------------------------------------------ hooks, TL signatures
    @property
    def mod_dict(self) -> dict:
        """Every submodule by name (TL's ``mod_dict``)."""
        return dict(self.named_modules())

    def setup(self) -> None:
        """Re-name every HookPoint after its module path (TL's ``setup()``; needed after adding modules)."""
        self.setup_hooks()

    def add_hook(self, name, hook, dir: str = "fwd", is_permanent: bool = False, level=None, prepend: bool = False) -> None:
        """Attach ``hook`` to the hook called ``name`` (or every hook a predicate selects) until
        ``reset_hooks()`` (``is_permanent=True``: until ``reset_hooks(including_permanent=True)``).
        Prefer ``model.hooks(...)``/``run_with_hooks``, which always clean up."""
        if prepend:
            raise ValueError("add_hook: prepend=True is not supported; hooks run in the order they were added")
        points = [hp for n, hp in self.hook_dict.items() if name(n)] if callable(name) else self._resolve_name(name)
        for hp in points:
            hp.add_hook(hook, dir=dir)
            if is_permanent:
                self.__dict__.setdefault("_tl_permanent", []).append((hp, hook, dir))

    def resolve_hooks(self, name) -> list:
        """As ``HookedRootModule.resolve_hooks``; also TL bridge's block aliases ``blocks.{l}.hook_in``
        (= ``hook_resid_pre``) and ``blocks.{l}.hook_out`` (= ``hook_resid_post``)."""
        if isinstance(name, str) and name not in self.hook_dict:
            bridge = BRIDGE_BLOCK_ALIAS.match(name)
            if bridge:
                name = get_act_name("resid_pre" if bridge.group(2) == "in" else "resid_post", int(bridge.group(1)))
        return super().resolve_hooks(name)

    _resolve = resolve_hooks

    def _resolve_name(self, name: str) -> list:
        """A full hook name, or a TL short name (``"resid_pre3"``) resolved with ``get_act_name``."""
        if name not in self.hook_dict:
            try:
                name = get_act_name(name) if get_act_name(name) in self.hook_dict else name
            except KeyError:
                pass
        return self._resolve(name)

    def reset_hooks(self, clear_contexts: bool = True, direction: str = "both", including_permanent: bool = False,
                    level=None) -> None:
        """Remove hooks added with ``add_hook`` (permanent ones too with ``including_permanent=True``)."""
        super().reset_hooks()
        permanent = self.__dict__.get("_tl_permanent", [])
        if including_permanent:
            permanent.clear()
        for hp, fn, d in permanent:
            hp.add_hook(fn, dir=d)

    def hooks(self, fwd_hooks=None, bwd_hooks=None, reset_hooks_end: bool = True, clear_contexts: bool = False):
        """Context manager attaching hooks (TL's signature; hooks are always removed at the end)."""
        return super().hooks(fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks)

    def run_with_hooks(self, *model_args, fwd_hooks=None, bwd_hooks=None, reset_hooks_end: bool = True,
                       clear_contexts: bool = False, **model_kwargs):
        """TL's signature; the model's forward arguments (``return_type`` ...) pass through."""
        return super().run_with_hooks(*model_args, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, **model_kwargs)

    def run_with_cache(self, *model_args, names_filter=None, device=None, remove_batch_dim: bool = False,
                       return_cache_object: bool = True, incl_bwd: bool = False, reset_hooks_end: bool = True,
                       clear_contexts: bool = False, pos_slice=None, **model_kwargs):
        """TL's ``run_with_cache``: ``remove_batch_dim`` (batch of 1 only), ``return_cache_object=False``
        gives a plain dict, ``incl_bwd`` runs ``backward()`` on the (scalar) output and caches gradients
        as ``"<name>_grad"``; ``pos_slice`` is refused (not supported)."""
        if pos_slice is not None:
            raise NotImplementedError("run_with_cache(pos_slice=...): not supported; slice the cached tensors, or pass "
                                      "pos_slice to the cache's residual-stream methods")
        if incl_bwd:
            out, cache = self._run_with_cache_bwd(model_args, names_filter, device, model_kwargs)
        else:
            out, cache = super().run_with_cache(*model_args, names_filter=names_filter, device=device, **model_kwargs)
        if remove_batch_dim:
            cache.remove_batch_dim()
        return out, (cache if return_cache_object else dict(cache.items()))

    def _run_with_cache_bwd(self, model_args, names_filter, device, model_kwargs):
        store, fwd = self.cache_hooks(names_filter, device)
        grads: dict = {}

        def save_grad(g: torch.Tensor, hook: HookPoint) -> None:
            grads[hook.name + "_grad"] = g.detach() if device is None else g.detach().to(device)

        bwd = [(name, save_grad) for name, _ in fwd]
        with super().hooks(fwd_hooks=fwd, bwd_hooks=bwd):
            out = self(*model_args, **model_kwargs)
            if not isinstance(out, torch.Tensor) or out.numel() != 1:
                raise ValueError("run_with_cache(incl_bwd=True) needs a scalar output: pass return_type='loss'")
            out.backward()
        store.update(grads)
        return out, ActivationCache(store, self, metadata={})

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """No-op: ``attn.hook_result`` always exists (computed only when something listens)."""

    def _refuse(self, what: str, value: bool) -> None:
        if value:
            raise NotImplementedError(f"{what}: Command-R's attention reads ln1's output directly; there are no "
                                      "per-head input hooks (hook q/k/v or blocks.{l}.ln1.hook_normalized instead)")

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        self._refuse("set_use_split_qkv_input", use_split_qkv_input)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        self._refuse("set_use_attn_in", use_attn_in)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        self._refuse("set_use_hook_mlp_in", use_hook_mlp_in)

    def set_ungroup_grouped_query_attention(self, ungroup_grouped_query_attention: bool) -> None:
        """TL's switch: ``True`` gives ``hook_k``/``hook_v`` one key/value copy per query head
        ``[batch pos head d_head]``, editable per head (``workbench.tl_gqa``); logits are unchanged."""
        self.cfg.ungroup_grouped_query_attention = ungroup_grouped_query_attention

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        cfg = self.__dict__.get("cfg")
        if cfg is not None and self.embed.weight.device.type != "meta":
            cfg.device, cfg.dtype = self.embed.weight.device, self.embed.weight.dtype
        return out

    # ------------------------------------------------------------------ generation
    def generate_tl(self, input, *args, prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None,
                    return_type: str = "input", stop_at_eos: bool = True, verbose: bool = False,
                    use_past_kv_cache: bool = True, **kwargs):
        """``generate`` accepting TL's arguments: a string (or list of strings) in gives text out
        (``return_type`` "input" / "str" / "tokens"); ``stop_at_eos=False`` never stops at EOS;
        ``verbose`` shows progress. Strings are left-padded and masked. Sampling follows transformers:
        greedy unless ``do_sample=True`` (sampling settings without it warn). In text out, an id
        the tokenizer lacks (the model's untrained rows past its vocabulary) reads as U+FFFD."""
        if args and isinstance(args[0], int) and not isinstance(args[0], bool):   # TL: generate(text, 20)
            kwargs["max_new_tokens"], args = args[0], args[1:]
        if kwargs.pop("freq_penalty", 0.0):
            raise NotImplementedError("freq_penalty: not supported; use repetition_penalty (transformers' semantics)")
        if return_type not in ("input", "str", "tokens"):
            raise ValueError(f"return_type: expected 'input', 'str' or 'tokens', got {return_type!r}")
        if not stop_at_eos:
            kwargs["eos_token_id"] = []
        if verbose:
            kwargs.setdefault("progress", True)
        original = input
        is_text = isinstance(input, str) or (isinstance(input, (list, tuple)) and input
                                             and all(isinstance(t, str) for t in input))
        if is_text:
            texts = [input] if isinstance(input, str) else list(input)
            ids, mask = self.tokenize_batch(texts, prepend_bos, "left")
            kwargs.setdefault("attention_mask", mask.to(self.device) if not bool(mask.all()) else None)
            input = ids.to(self.device)
        elif isinstance(input, torch.Tensor) and input.dim() == 1:
            input = input[None]
        out = _generate_ids(self, input, *args, **kwargs)
        if return_type == "str" or (return_type == "input" and is_text):
            mask = kwargs.get("attention_mask")
            n_pad = (mask == 0).sum(-1).tolist() if mask is not None else [0] * out.shape[0]
            # without the left padding; a generated id past the tokenizer's vocabulary shows as U+FFFD
            text = [self.to_string(row[k:], errors="replace") for row, k in zip(out, n_pad)]
            return text[0] if isinstance(original, str) else text
        return out
