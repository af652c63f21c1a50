"""TransformerLens' weight processing on HookedCommandR (a mixin): ``enable_compatibility_mode``,
``fold_layer_norm``, ``center_writing_weights``, ``tl_named_parameters`` / ``tl_parameters``.

What each step does on Command-R (the model's logits are unchanged up to float rounding):

* ``fold_ln``: each block's ``ln1`` weight is multiplied into the weights that read it (q/k/v,
  gate/up) and set to ones, so ``ln1`` only centres and divides by ``hook_scale``, as TL's
  ``LNPre``. ``ln_final`` is NOT folded: its reader is the unembedding, tied to the embedding.
* ``center_writing_weights``: ``W_O`` and ``W_out`` get their mean over d_model removed (every
  reader of the residual is a LayerNorm, which removes it anyway). ``W_E`` is left alone (tied).
* ``center_unembed``: skipped (tied unembedding); logit differences, the loss and probabilities
  are what centring would leave unchanged, raw logits keep their per-position offset.
* ``refactor_factored_attn_matrices``: skipped with a warning; TL refuses it for rotary models too.

Example::

    model = HookedCommandR.from_pretrained("command-r-tiny")
    model.enable_compatibility_mode(disable_warnings=True)   # fold ln1, centre W_O / W_out
    model.blocks[0].ln1.weight                                # all ones now
"""

from __future__ import annotations

import warnings

import torch

from .hook_names import block_name


def _weight_ok(w: torch.Tensor, what: str) -> None:
    if w.device.type == "meta" or not w.is_floating_point():
        raise ValueError(f"{what}: weight processing needs plain floating-point weights in memory, got "
                         f"{w.dtype} on {w.device} (offloaded or quantized models cannot be folded)")


class TLProcessingMixin:
    """TransformerLens' ``enable_compatibility_mode`` and the weight-processing steps it runs."""

    def enable_compatibility_mode(self, disable_warnings: bool = False, no_processing: bool = False,
                                  fold_ln: bool = True, center_writing_weights: bool = True,
                                  center_unembed: bool = True, fold_value_biases: bool = True,
                                  refactor_factored_attn_matrices: bool = False) -> None:
        """TL's TransformerBridge call: process the weights as HookedTransformer did (see the module
        docstring for what each step means on Command-R; ``no_processing=True`` changes nothing).
        ``fold_value_biases`` is a no-op (Command-R has no biases)."""
        notes = []
        if not no_processing:
            if fold_ln:
                self.fold_layer_norm()
            if center_writing_weights:
                self.center_writing_weights()
                notes.append("W_E is not centred (tied to the unembedding)")
            if center_unembed:
                notes.append("center_unembed skipped (tied unembedding): raw logits keep a per-position offset, "
                             "logit differences and probabilities are unaffected")
            if refactor_factored_attn_matrices:
                notes.append("refactor_factored_attn_matrices skipped: the QK circuit depends on position under "
                             "rotary embeddings (TransformerLens refuses it for rotary models too)")
        if notes and not disable_warnings:
            warnings.warn("enable_compatibility_mode on Command-R: " + "; ".join(notes), stacklevel=2)

    @torch.no_grad()
    def fold_layer_norm(self) -> None:
        """Fold each block's ``ln1`` weight into q/k/v and gate/up; ``ln1.weight`` becomes ones."""
        for block in self.blocks:
            w = block.ln1.weight
            _weight_ok(w, block_name(block.layer, "ln1.weight"))
            readers = (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.gate_proj, block.mlp.up_proj)
            for lin in readers:
                _weight_ok(lin.weight, block_name(block.layer, type(lin).__name__))
            for lin in readers:
                folded = lin.weight.float() * w.float()[None, :]                 # [out d_model]
                lin.weight.copy_(folded.to(lin.weight.dtype))
            w.fill_(1.0)

    @torch.no_grad()
    def center_writing_weights(self) -> None:
        """Remove the mean over d_model from every block's ``W_O`` and ``W_out`` (``W_E`` is tied: kept)."""
        for block in self.blocks:
            for lin in (block.attn.o_proj, block.mlp.down_proj):
                _weight_ok(lin.weight, block_name(block.layer, type(lin).__name__))
                w = lin.weight.float()                                            # [d_model in]
                lin.weight.copy_((w - w.mean(0, keepdim=True)).to(lin.weight.dtype))

    def tl_named_parameters(self):
        """(name, tensor) pairs under TransformerLens' names (``blocks.0.attn.W_Q`` ...), head-major."""
        yield "embed.W_E", self.W_E
        for i, block in enumerate(self.blocks):
            yield block_name(i, "ln1.w"), block.ln1.weight
            for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
                yield block_name(i, "attn." + name), getattr(block.attn, name)
            for name in ("W_in", "W_gate", "W_out", "b_in", "b_out"):
                yield block_name(i, "mlp." + name), getattr(block.mlp, name)
        yield "ln_final.w", self.ln_final.weight
        yield "unembed.W_U", self.W_U
        yield "unembed.b_U", self.b_U

    def tl_parameters(self) -> dict:
        """``dict(tl_named_parameters())``."""
        return dict(self.tl_named_parameters())
