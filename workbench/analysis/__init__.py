"""Standard analyses whose numbers add up: logit lens, direct logit attribution, head scores,
attribution patching.

Example::

    from workbench.analysis import logit_lens, direct_logit_attribution, induction_scores
    lens = logit_lens(model, ids, top_k=5)
    dla = direct_logit_attribution(model, ids, answer=42)
    induction_scores(model)                              # [n_layers n_heads]
    attribution_patching(model, clean_ids, corrupt_ids, metric, kind="z")   # ≈ patch_sweep - metric(corrupt)
    context_attribution(model, tok, messages, documents)  # which document drove each span of a rag reply
    rows = attention_rows(model, ids, queries=[-1])      # {layer: [batch head 1 k_pos]}, long prompts

Residual-stream helpers (``accumulated_resid``, ``decompose_resid``, ``head_results``,
``stack_head_results``, ``apply_ln_to_stack``, ``logit_attrs``) are functions of a cache, defined in
``workbench.cache_analysis`` (below the cache, so the cache can offer them as methods too) and
re-exported here.
"""

from ..cache_analysis import (accumulated_resid, apply_ln_to_stack, decompose_resid, head_results, logit_attrs,
                              stack_head_results)
from .attention_rows import AttentionRecorder, attention_rows, attention_to_spans
from .attribution import LogitAttribution, direct_logit_attribution
from .attribution_patching import AttributionPatching, ExactPatches, attribution_patching
from .context_attribution import ContextAttribution, context_attribution
from .head_scores import (duplicate_token_scores, induction_scores, pattern_scores, previous_occurrence,
                          previous_token_scores, repeated_random_tokens)
from .logit_lens import LogitLens, lens_logits, lens_resid_names, lens_top, logit_lens
from .spans import Span, spans_from_chat

__all__ = [
    "accumulated_resid", "apply_ln_to_stack", "decompose_resid", "head_results", "logit_attrs", "stack_head_results",
    "AttentionRecorder", "AttributionPatching", "ContextAttribution", "ExactPatches", "LogitAttribution", "LogitLens",
    "Span", "attention_rows", "attention_to_spans", "attribution_patching", "context_attribution",
    "direct_logit_attribution", "duplicate_token_scores", "induction_scores", "lens_logits", "lens_resid_names",
    "lens_top", "logit_lens", "pattern_scores", "previous_occurrence", "previous_token_scores",
    "repeated_random_tokens", "spans_from_chat",
]
