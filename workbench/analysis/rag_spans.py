"""Where the documents sit in a rendered ``rag`` prompt, how a reply splits into spans, and what it cites.

Command-R's ``rag`` template writes the documents between ``<results>`` and ``</results>`` (one block
``"\\nDocument: i\\ntitle: ...\\ntext: ...\\n"`` each) and asks for a reply in four parts::

    Relevant Documents: 0,2
    Cited Documents: 0
    Answer: Alice lives in Paris.
    Grounded answer: <co: 0>Alice lives in Paris</co: 0>.

Document ranges are found by rendering the template with the first k documents for every k (so no
template text is hard-coded), then mapped to tokens through the tokenizer's character spans; the
citation markup ``<co: 0,2>claim</co: 0,2>`` is parsed into the documents each span cites.

These ranges and ``workbench.analysis.spans_from_chat``'s ``"document i"`` spans describe the same rendering
(the same ids) but different extents, on purpose: here a document is its WHOLE block (the ``Document: i``
header and field names included), because the ablation method removes exactly that block and the prompt must
read as if the document had never been given; ``spans_from_chat`` covers the field values only (first value to
last), the tokens a reader would call the document's content. Every ``spans_from_chat`` document span lies
inside the corresponding block here. Use these ranges for attribution (all methods score the same tokens an
ablation removes) and ``spans_from_chat`` for attention maps of whole conversations (turns, system, question).

Example::

    prompt = rag_prompt(tok, [{"role": "user", "content": "Where does Alice live?"}], documents)
    prompt.ranges[1]                 # DocumentRange(index=1, start=412, end=431, ...)  tokens of document 1
    text, spans = response_spans(tok, tok.encode(reply, add_special_tokens=False))
    citation_matrix(reply, spans, n_documents=3)                # [n_spans n_documents] bool
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

LABELS = ("Relevant Documents", "Cited Documents", "Answer", "Grounded answer")
CITATION = re.compile(r"<co:\s*([0-9,\s]*)>(.*?)</co:\s*[0-9,\s]*>", re.S)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_LABEL = re.compile(r"^(" + "|".join(re.escape(x) for x in LABELS) + r"):\s*")


@dataclass(frozen=True)
class DocumentRange:
    """Document ``index`` in the rendered prompt: tokens ``[start, end)`` and characters ``[char_start, char_end)``
    of its whole block (header ``Document: i`` included). ``exact`` is True when both ends fall on token
    boundaries, so removing the tokens removes exactly the block's text."""

    index: int
    start: int
    end: int
    char_start: int
    char_end: int
    exact: bool


@dataclass
class RagPrompt:
    """A rendered ``rag`` prompt: ``text``, ``ids`` and one ``DocumentRange`` per document (in order)."""

    text: str
    ids: list
    ranges: list
    documents: list

    @property
    def prefix_length(self) -> int:
        """Tokens before the first document: shared by every ablation of the documents."""
        return self.ranges[0].start


@dataclass(frozen=True)
class Span:
    """A piece of the reply: ``text`` = ``response[start:end]`` (characters) and response tokens
    ``[token_start, token_end)``; ``label`` names the reply part it belongs to ("Answer", ...) or None."""

    text: str
    start: int
    end: int
    token_start: int
    token_end: int
    label: str | None = None


@dataclass
class Citations:
    """Parsed ``<co: ...>`` markup: per region the characters ``[start, end)`` it wraps and its documents."""

    regions: list = field(default_factory=list)     # [(start, end, [doc, ...])]
    unknown: list = field(default_factory=list)     # document numbers cited but not given


def check_documents(documents) -> list:
    """``documents`` must be a non-empty list of dicts (the ``rag`` template's ``title``/``text`` records)."""
    if isinstance(documents, (str, bytes, Mapping)) or not isinstance(documents, Sequence) or len(documents) == 0:
        raise ValueError("documents: expected a non-empty list of dicts such as {'title': ..., 'text': ...}, "
                         f"got {type(documents).__name__}{'' if not isinstance(documents, Sequence) else ' of length ' + str(len(documents))}")
    for i, d in enumerate(documents):
        if not isinstance(d, Mapping) or not d:
            raise ValueError(f"documents[{i}]: expected a non-empty dict such as {{'title': ..., 'text': ...}}, got {d!r}")
    return [dict(d) for d in documents]


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def rag_prompt(tokenizer, messages, documents, chat_template: str = "rag", **template_kwargs) -> RagPrompt:
    """Render ``messages`` with ``documents`` in the ``rag`` template (generation prompt included) and locate
    every document's tokens.

    Document k's block is the text that rendering with ``documents[:k + 1]`` inserts into the rendering with
    ``documents[:k]``; its tokens are those whose first character lies in the block.

    Example::

        p = rag_prompt(tok, [{"role": "user", "content": "Who is the tallest penguin?"}],
                       [{"title": "Tall penguins", "text": "Emperor penguins are the tallest."}])
        tok.decode(p.ids[p.ranges[0].start:p.ranges[0].end])   # '\\nDocument: 0\\ntitle: Tall penguins\\n...'
    """
    documents = check_documents(documents)

    def render(docs):
        return tokenizer.apply_chat_template(messages, documents=docs, chat_template=chat_template,
                                             add_generation_prompt=True, tokenize=False, **template_kwargs)

    texts = [render(documents[:k]) for k in range(len(documents) + 1)]
    starts, ends = [], []
    for k, doc in enumerate(documents):
        a, b = texts[k], texts[k + 1]
        q, d = _common_prefix(a, b), len(b) - len(a)
        if d <= 0 or b[:q] + b[q + d:] != a:
            raise ValueError(f"chat_template {chat_template!r}: adding documents[{k}] does not insert one block of "
                             "text into the prompt; cannot locate the documents in this template")
        block = b[q:q + d]
        missing = [key for key, value in doc.items() if str(value) not in block]
        if missing:
            raise ValueError(f"chat_template {chat_template!r}: the text inserted for documents[{k}] does not "
                             f"contain its field(s) {missing}; cannot locate the documents in this template")
        starts.append(q)
        ends.append(q + d)
    text = texts[-1]
    # later documents are inserted after earlier ones: block k keeps its start in the full prompt
    bounds = [(starts[k], starts[k + 1] if k + 1 < len(documents) else ends[-1]) for k in range(len(documents))]
    ids = tokenizer.encode(text, add_special_tokens=False)
    pieces = tokenizer.token_pieces(ids)
    if tokenizer.decode(ids) != text:
        raise ValueError("tokenizer: decoding the rendered rag prompt does not give its text back (normalisation "
                         "changed it); NFC-normalise the messages and documents first")
    first = [p.span[0] for p in pieces]
    token_starts = set(first)
    ranges = []
    for k, (cs, ce) in enumerate(bounds):
        toks = [i for i, s in enumerate(first) if cs <= s < ce and pieces[i].span[1] > s]
        if not toks:
            raise ValueError(f"documents[{k}]: no token starts inside its block of the rendered prompt")
        exact = cs in token_starts and (ce in token_starts or ce == len(text))
        ranges.append(DocumentRange(k, toks[0], toks[-1] + 1, cs, ce, exact))
    return RagPrompt(text, ids, ranges, documents)


def parse_citations(text: str, n_documents: int | None = None) -> Citations:
    """The ``<co: i,j>claim</co: i,j>`` regions of ``text`` (characters of the claim, cited documents).

    Example::

        parse_citations("<co: 0,2>Alice lives in Paris</co: 0,2>.").regions   # [(9, 29, [0, 2])]
    """
    out = Citations()
    for m in CITATION.finditer(text):
        docs = sorted({int(x) for x in re.findall(r"\d+", m.group(1))})
        if n_documents is not None:
            out.unknown += [d for d in docs if d >= n_documents]
            docs = [d for d in docs if d < n_documents]
        out.regions.append((m.start(2), m.end(2), docs))
    return out


def _sentence_spans(text: str) -> list:
    """(start, end, label) of every sentence, line by line, without the reply-part labels."""
    out, pos = [], 0
    for line in text.split("\n"):
        label, body = None, 0
        m = _LABEL.match(line)
        if m:
            label, body = m.group(1), m.end()
        start = body
        for piece in _SENTENCE_END.split(line[body:]) + [None]:
            if piece is None:
                break
            s = line.index(piece, start) if piece else start
            e = s + len(piece.rstrip())
            if piece.strip():
                lead = len(piece) - len(piece.lstrip())
                out.append((pos + s + lead, pos + e, label))
            start = s + len(piece)
        pos += len(line) + 1
    return out


def response_spans(tokenizer, response_ids, spans="sentences") -> tuple[str, list]:
    """The reply text and its ``Span``s: ``"sentences"`` (every sentence of every line, the reply-part
    labels left out), ``"all"`` (the whole reply) or a list of ``(start, end)`` character ranges or
    substrings of the reply.

    Example::

        text, spans = response_spans(tok, ids)           # ids: the reply's token ids
        [(s.label, s.text) for s in spans]                # [('Relevant Documents', '1'), ..., ('Answer', ...)]
    """
    ids = list(response_ids)
    pieces = tokenizer.token_pieces(ids)
    text = b"".join(p.bytes for p in pieces).decode("utf-8", "replace")
    if spans == "sentences":
        bounds = _sentence_spans(text)
    elif spans == "all":
        stripped = text.rstrip()
        lead = len(stripped) - len(stripped.lstrip())
        bounds = [(lead, len(stripped), None)]
    elif isinstance(spans, Sequence) and not isinstance(spans, (str, bytes)):
        bounds = []
        for i, s in enumerate(spans):
            if isinstance(s, str):
                at = text.find(s)
                if not s or at < 0:
                    raise ValueError(f"spans[{i}]: {s!r} is not a substring of the response {text!r}")
                bounds.append((at, at + len(s), None))
            elif (isinstance(s, Sequence) and len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in s)):
                if not 0 <= s[0] < s[1] <= len(text):
                    raise ValueError(f"spans[{i}]: character range {tuple(s)} lies outside the response "
                                     f"(0 <= start < end <= {len(text)} characters)")
                bounds.append((s[0], s[1], None))
            else:
                raise ValueError(f"spans[{i}]: expected a (start, end) character range or a substring, got {s!r}")
    else:
        raise ValueError(f"spans: expected 'sentences', 'all' or a list of (start, end) ranges / substrings, got {spans!r}")
    if not bounds:
        raise ValueError(f"response: no span found in {text!r} (empty reply?)")
    out = []
    for start, end, label in bounds:
        toks = [i for i, p in enumerate(pieces) if p.span[0] < end and p.span[1] > start and p.span[1] > p.span[0]]
        if not toks:
            raise ValueError(f"span {text[start:end]!r}: covers no token of the response")
        out.append(Span(text[start:end], start, end, toks[0], toks[-1] + 1, label))
    return text, out


def citation_matrix(text: str, spans: list, n_documents: int) -> tuple[torch.Tensor, Citations]:
    """``[n_spans n_documents]`` booleans: span s overlaps a ``<co: ...>`` region citing document d."""
    cites = parse_citations(text, n_documents)
    out = torch.zeros(len(spans), n_documents, dtype=torch.bool)
    for s, span in enumerate(spans):
        for start, end, docs in cites.regions:
            if start < span.end and end > span.start:
                out[s, docs] = True
    return out, cites
