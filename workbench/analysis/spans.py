"""Named token spans of a chat rendering: each document, the system preamble, each turn, the question.

``spans_from_chat`` renders a conversation with the tokenizer's chat template and finds where each
part landed without knowing the template: it renders again with that one part's text replaced by
placeholder characters, and the characters that differ are the part's. Character ranges become
token ranges through the tokenizer's per-token character spans (a token straddling a boundary
belongs to both neighbours). Feed the spans to ``attention_to_spans``.

Example::

    ids, spans = spans_from_chat(tok, [{"role": "user", "content": "Who won?"}], documents=docs)
    [(s.name, s.end - s.start) for s in spans]  # [('user 0', 3), ('question', 3), ('document 0', 41), ...]
"""

from __future__ import annotations

import bisect
from typing import Any, NamedTuple, Optional, Sequence

import torch

_PLACEHOLDER = "\ue000"   # a private-use character: never equal to the text it replaces


class Span(NamedTuple):
    """A named token range ``[start, end)`` of ``input_ids``."""

    name: str
    start: int
    end: int


def spans_from_chat(tokenizer, messages: Sequence[dict], documents: Optional[Sequence[dict]] = None,
                    chat_template: Optional[str] = None, add_generation_prompt: bool = True,
                    **template_kwargs: Any) -> tuple[torch.Tensor, list[Span]]:
    """``(input_ids [1, pos], spans)`` for one conversation rendered with ``tokenizer``'s chat template.

    Spans, sorted by start: ``"system"`` (a leading system message: Command-R's user preamble),
    ``"<role> <i>"`` for message i's content, ``"question"`` (the last user message, the same range
    as its turn) and ``"document <i>"`` (document i's rendered fields, from its first value to its
    last). With ``documents`` and no ``chat_template`` the "rag" template is used when the
    tokenizer has one. Ranges cover the parts' own text, not the template's markup around them.

    Example::

        ids, spans = spans_from_chat(tok, messages, documents=docs, citation_mode="fast")
        mass = attention_to_spans(model, ids, spans, queries=[-1])
    """
    if isinstance(messages, (str, bytes)) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ValueError("messages: expected a non-empty list of {'role', 'content'} dicts (one conversation)")
    if chat_template is None and documents is not None and "rag" in getattr(tokenizer, "template_names", ()):
        chat_template = "rag"

    def render(msgs, docs) -> str:
        return tokenizer.apply_chat_template(list(msgs), documents=docs, chat_template=chat_template,
                                             add_generation_prompt=add_generation_prompt, tokenize=False,
                                             **template_kwargs)

    text = render(messages, documents)
    char_spans: list[tuple[str, int, int]] = []
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, str):
            continue
        changed = [dict(m) for m in messages]
        changed[i]["content"] = _PLACEHOLDER * max(1, len(content))
        a, b = _differing(text, render(changed, documents))
        name = "system" if i == 0 and message.get("role") == "system" else f"{message.get('role')} {i}"
        char_spans.append((name, a, b))
        if i == last_user:
            char_spans.append(("question", a, b))
    for i, document in enumerate(documents or ()):
        changed_docs = [dict(d) for d in documents]
        changed_docs[i] = {key: _PLACEHOLDER * max(1, len(str(value))) for key, value in document.items()}
        a, b = _differing(text, render(messages, changed_docs))
        char_spans.append((f"document {i}", a, b))

    ids = tokenizer.encode(text, add_special_tokens=False)
    if tokenizer.decode(ids) != text:
        raise ValueError("spans_from_chat: the tokenizer does not decode the rendering back to the same text "
                         "(a normalizer changes it), so character ranges cannot be mapped to tokens")
    pieces = tokenizer.token_pieces(ids)
    starts, ends = [p.span[0] for p in pieces], [p.span[1] for p in pieces]
    spans = [Span(name, *_token_range(starts, ends, a, b)) for name, a, b in char_spans]
    spans.sort(key=lambda s: (s.start, s.end))
    return torch.tensor([ids], dtype=torch.long), spans


def _differing(a: str, b: str) -> tuple[int, int]:
    """[start, end) of the characters of ``a`` that differ from ``b`` (common prefix and suffix removed)."""
    n = min(len(a), len(b))
    prefix = _common(lambda k: a[:k] == b[:k], n)
    suffix = _common(lambda k: a[len(a) - k:] == b[len(b) - k:], n - prefix)
    return prefix, len(a) - suffix


def _common(equal, n: int) -> int:
    """The largest k <= n with equal(k) (equal is monotone), by bisection on C-speed slice compares."""
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if equal(mid) else (lo, mid - 1)
    return lo


def _token_range(starts: list, ends: list, a: int, b: int) -> tuple[int, int]:
    """Tokens whose character span overlaps [a, b) (an empty range maps to an empty token range)."""
    first = bisect.bisect_right(ends, a)                   # first token ending after a
    if a >= b:
        return first, first
    return first, max(first, bisect.bisect_left(starts, b))  # up to the last token starting before b
