"""Which document drove each part of a grounded answer, beside the documents the model says it cited.

``context_attribution`` renders the conversation and documents in Command-R's ``rag`` template, takes
(or generates, greedily) the reply, splits it into spans (sentences, the whole reply, or given ranges)
and scores every (span, document) pair with one of three methods (see ``context_methods``):

* ``"ablation"``: the span's log-probability with all documents minus without the document
  (exact leave-one-out), or a Lasso surrogate on ``n_ablations`` random subsets (ContextCite);
* ``"attention"``: attention mass from the span's tokens to the document, layers and heads averaged
  (``details["per_layer_head"]`` keeps the breakdown); computed by ``attention_to_spans`` from the span's
  query rows only, so memory stays O(span tokens x prompt) at long context;
* ``"gradient"``: gradient x input of the span's log-probability at ``hook_embed``: per token the magnitude
  |g . x|, summed per document (the signed sums are in ``details["signed"]``).

The model's own claims come from its citation markup (``<co: 0,2>...</co: 0,2>``): ``model_citations``
``[n_spans n_documents]``, and ``agreement`` = the share of citing spans whose top-scored document is
one they cite. A document's tokens are its whole rendered block (``rag_spans``: header and field names
included, the same tokens the ablation removes); ``spans_from_chat``'s ``"document i"`` spans are the field
values inside that block.

Example::

    from workbench.analysis import context_attribution
    docs = [{"title": "Alice's home", "text": "Alice lives in Paris."},
            {"title": "Bob's job", "text": "Bob is a baker."}]
    res = context_attribution(model, tok, [{"role": "user", "content": "Where does Alice live?"}], docs)
    res.response                        # 'Relevant Documents: 0\\nCited Documents: 0\\nAnswer: ...'
    res.scores.shape                    # [n_spans n_documents]
    res.top_documents(), res.model_citations, res.agreement
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .context_methods import ablation_scores, attention_scores, gradient_scores
from .rag_spans import RagPrompt, check_documents, citation_matrix, rag_prompt, response_spans

METHODS = ("ablation", "attention", "gradient")
ABLATIONS = ("remove", "rerender", "mask")


@dataclass
class ContextAttribution:
    """Scores ``[n_spans n_documents]`` (float32; higher = the document mattered more to the span).

    ``spans``: ``Span`` (text, character and response-token ranges, reply part label); ``documents``:
    the documents as given; ``document_ranges``: their token ranges in ``prompt_ids``;
    ``model_citations`` ``[n_spans n_documents]`` bool from the reply's ``<co: ...>`` markup;
    ``agreement``: share of the spans that cite something whose top-scored document is cited (None when
    no span cites); ``details``: method-specific extras (``per_layer_head``, ``forward_equivalents``, ...).
    """

    method: str
    scores: torch.Tensor
    spans: list
    documents: list
    document_ranges: list
    model_citations: torch.Tensor
    response: str
    prompt_ids: list
    response_ids: list
    unknown_citations: list = field(default_factory=list)
    details: dict = field(default_factory=dict)

    @property
    def agreement(self) -> float | None:
        citing = self.model_citations.any(dim=1)
        if not bool(citing.any()):
            return None
        top = self.scores.argmax(dim=1)
        hits = self.model_citations[torch.arange(len(self.spans)), top]
        return float(hits[citing].float().mean())

    def top_documents(self) -> list:
        """Per span, the document indices from most to least important."""
        return [row.argsort(descending=True).tolist() for row in self.scores]

    def disagreements(self) -> list:
        """Indices of the spans that cite documents but whose top-scored document is not among them."""
        top = self.scores.argmax(dim=1)
        return [s for s in range(len(self.spans))
                if bool(self.model_citations[s].any()) and not bool(self.model_citations[s, top[s]])]

    def __repr__(self) -> str:
        return (f"ContextAttribution(method={self.method!r}, scores={list(self.scores.shape)}, "
                f"spans={len(self.spans)}, agreement={self.agreement})")


def _plain_ids(value) -> list | None:
    if isinstance(value, torch.Tensor):
        if value.dim() == 2 and value.shape[0] == 1:
            value = value[0]
        if value.dim() != 1 or value.dtype.is_floating_point:
            raise ValueError(f"response: expected a string or 1-D token ids, got a tensor of shape {tuple(value.shape)}")
        return value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise ValueError("response: expected a string or a list of int token ids")
        return list(value)
    return None


def reply_ids(tokenizer, prompt: RagPrompt, response) -> list:
    """The reply's token ids from ``response``: the reply text, the reply's ids, or prompt + reply (text or
    ids, e.g. ``generate``'s output); a trailing ``<|END_OF_TURN_TOKEN|>`` is dropped."""
    eos = tokenizer.eos_token_id
    ids = _plain_ids(response)
    if ids is None:
        if not isinstance(response, str):
            raise ValueError(f"response: expected None, a string or token ids, got {type(response).__name__}")
        text = response[len(prompt.text):] if response.startswith(prompt.text) else response
        specials = [t for t in ("<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|USER_TOKEN|>",
                                "<|SYSTEM_TOKEN|>") if t in text]
        if specials:
            raise ValueError(f"response: not a continuation of the rendered rag prompt (it contains {specials[0]!r}); "
                             "pass the reply alone, or the full text that starts with the prompt")
        ids = tokenizer.encode(text, add_special_tokens=False)
    else:
        P = len(prompt.ids)
        if len(ids) > P and ids[:P] == list(prompt.ids):
            ids = ids[P:]
        elif set(ids) & {tokenizer.bos_token_id, tokenizer.convert_tokens_to_ids("<|START_OF_TURN_TOKEN|>")}:
            raise ValueError("response: these token ids start like a prompt but do not continue the rendered rag "
                             f"prompt ({P} tokens); pass the reply's ids alone, or prompt + reply")
    while ids and ids[-1] == eos:
        ids = ids[:-1]
    if eos in ids:
        raise ValueError("response: <|END_OF_TURN_TOKEN|> in the middle of the reply: not one turn's continuation")
    if not ids:
        raise ValueError("response: the reply is empty")
    return ids


def generate_reply(model, tokenizer, prompt: RagPrompt, max_new_tokens: int = 128) -> list:
    """Greedy reply to the rendered prompt (``model.generate``), without its ``<|END_OF_TURN_TOKEN|>``."""
    ids = torch.tensor([prompt.ids], device=model.device)
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    return new[:new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def context_attribution(model, tokenizer, messages, documents, response=None, method: str = "ablation",
                        spans="sentences", n_ablations: int | None = None, *, chat_template: str = "rag",
                        ablation: str = "remove", batch_size: int = 8, max_new_tokens: int = 128, seed: int = 0,
                        alpha: float | None = None, max_exact: int = 16, **template_kwargs) -> ContextAttribution:
    """Score how much each document drove each span of the reply; see the module docstring.

    ``response``: None (greedy generation), the reply text or ids, or prompt + reply. ``spans``:
    ``"sentences"``, ``"all"`` or a list of ``(start, end)`` character ranges / substrings of the reply.
    ``n_ablations`` (method "ablation"): None = exact leave-one-out (one forward per document) when there are
    at most ``max_exact`` documents, else 64 random subsets; an int = that many random subsets (each document
    kept with probability 1/2) and a Lasso surrogate (``alpha`` default 0.01 x std of the log-probabilities).
    ``ablation``: "remove" (drop the document's tokens; the other documents keep their numbers, so the
    reply's citation numbers still point at them), "rerender" (the template rendered without the document:
    later documents are renumbered, which also changes what the reply's numbers refer to) or "mask" (keep
    the tokens, hide them from attention).
    Extra keyword arguments go to the template (e.g. ``citation_mode="fast"``).

    Example::

        res = context_attribution(model, tok, messages, docs, method="gradient", spans="all")
        res.scores[0].argmax()          # the document the whole reply leaned on most
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation: expected one of {ABLATIONS}, got {ablation!r}")
    if n_ablations is not None and (not isinstance(n_ablations, int) or isinstance(n_ablations, bool) or n_ablations < 2):
        raise ValueError(f"n_ablations: expected None (exact leave-one-out) or an int >= 2, got {n_ablations!r}")
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise ValueError("messages: expected a non-empty list of {'role', 'content'} dicts")
    documents = check_documents(documents)
    if n_ablations is None and len(documents) > max_exact:
        n_ablations = 64
    prompt = rag_prompt(tokenizer, messages, documents, chat_template=chat_template, **template_kwargs)
    if response is None:
        ids = generate_reply(model, tokenizer, prompt, max_new_tokens)
        if not ids:
            raise ValueError("response: the model's greedy reply is empty (it ended its turn at once)")
    else:
        ids = reply_ids(tokenizer, prompt, response)
    text, span_list = response_spans(tokenizer, ids, spans)
    cited, parsed = citation_matrix(text, span_list, len(documents))
    if method == "ablation":
        def render(kept: list) -> list:
            return tokenizer.apply_chat_template(messages, documents=[documents[i] for i in kept],
                                                 chat_template=chat_template, add_generation_prompt=True,
                                                 **template_kwargs)

        scores, details = ablation_scores(model, prompt, ids, span_list, n_ablations, ablation, batch_size, seed,
                                          alpha, render)
    elif method == "attention":
        scores, details = attention_scores(model, prompt, ids, span_list)
    else:
        scores, details = gradient_scores(model, prompt, ids, span_list)
    return ContextAttribution(method, scores, span_list, documents, prompt.ranges, cited, text, list(prompt.ids),
                              ids, parsed.unknown, details)
