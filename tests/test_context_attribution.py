"""context_attribution on the bundled model: ablation against an independent leave-one-out, the true source
document first for every method, spans and citations of multi-sentence replies, the real Command-R
tokenizer's rag template, bad input, and the ContextView widget."""

from __future__ import annotations

import gzip
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import alias_fixture
from workbench.analysis import context_attribution
from workbench.analysis.context_methods import lasso
from workbench.analysis.rag_spans import parse_citations, rag_prompt
from workbench.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO / "scripts"))
from tiny_data import RagData  # noqa: E402

HELD_OUT = 515151            # not the training stream (seed 20) nor the model card's evaluation questions
DOCUMENTS = [{"title": "Tall penguins", "text": "Emperor penguins are the tallest."},
             {"title": "Penguin habitats", "text": "Emperor penguins only live in Antarctica."},
             {"title": "What are animals?", "text": "Animals are different from plants."}]


pytestmark = pytest.mark.usefixtures("one_thread")
tok = alias_fixture("bundled_tokenizer")
model = alias_fixture("bundled_model")


def held_out(n: int, kind=None) -> list:
    """Held-out synthetic conversations; kind="single" keeps those answered by one document."""
    data, out = RagData(HELD_OUT), []
    while len(out) < n:
        ex = data.example()
        if kind == "single" and len(ex["sources"]) != 1:
            continue
        if kind == "two" and not (len(ex["sources"]) == 2 and ex["response"].count("<co:") == 2):
            continue
        out.append(ex)
    return out


def span_logprob(model, ids: list, n_response: int, token_range) -> float:
    """log p of the reply's tokens [a, b) in one plain forward (no cache, no padding)."""
    with torch.no_grad():
        logp = model(torch.tensor([ids])).float().log_softmax(-1)[0]
    start = len(ids) - n_response
    a, b = token_range
    return sum(float(logp[start + j - 1, ids[start + j]]) for j in range(a, b))


# ------------------------------------------------------------------------------------------- ablation
def test_ablation_is_leave_one_out_computed_independently(model, tok):
    ex = held_out(1, "two")[0]
    res = context_attribution(model, tok, ex["messages"], ex["documents"], response=ex["response"])
    prompt = tok.apply_chat_template(ex["messages"], documents=ex["documents"], chat_template="rag",
                                     add_generation_prompt=True, tokenize=False)
    reply = tok.encode(ex["response"], add_special_tokens=False)
    text = prompt
    for i, span in enumerate(res.spans):
        full = span_logprob(model, tok.encode(prompt, add_special_tokens=False) + reply, len(reply),
                            (span.token_start, span.token_end))
        for d, doc in enumerate(ex["documents"]):
            block = "\nDocument: %d\n" % d + "".join(f"{k}: {v}\n" for k, v in doc.items())
            assert block in text
            without = tok.encode(text.replace(block, "", 1), add_special_tokens=False) + reply
            expected = full - span_logprob(model, without, len(reply), (span.token_start, span.token_end))
            assert abs(float(res.scores[i, d]) - expected) < 2e-3 * max(1.0, abs(expected)), (i, d)
    assert res.details["forward_equivalents"] < len(ex["documents"]) + 1     # the shared prefix ran once


def test_surrogate_fit_on_random_subsets(model, tok):
    """n_ablations=k: k random subsets (plus the full prompt) whose span log-probabilities are those of the
    prompts with just those documents, and scores = the Lasso weights fitted on them."""
    messages, docs, reply, k = copy_cases(1, seed=11)[0]
    kw = dict(response=reply, spans="all", chat_template=SHORT)
    exact = context_attribution(model, tok, messages, docs, **kw)
    fitted = context_attribution(model, tok, messages, docs, n_ablations=16, seed=1, **kw)
    keep, lp = fitted.details["keep"], fitted.details["logprobs"]
    assert fitted.details["fit"] == "lasso" and keep.shape == (17, len(docs)) and bool(keep[0].all())
    assert exact.details["fit"] == "leave-one-out" and exact.details["keep"].shape == (len(docs) + 1, len(docs))
    torch.testing.assert_close(lp[0], exact.details["full_logprob"], rtol=0, atol=1e-3)
    prompt = tok.apply_chat_template(messages, documents=docs, chat_template=SHORT, add_generation_prompt=True,
                                     tokenize=False)
    ids = tok.encode(reply, add_special_tokens=False)
    for row in (1, 2):                                          # a subset's log-probability, independently
        text = prompt
        for d in (i for i in range(len(docs)) if not keep[row, i]):
            block = f"Document: {d}\n" + "".join(f"{key}: {v}\n" for key, v in docs[d].items())
            text = text.replace(block, "", 1)
        got = span_logprob(model, tok.encode(text, add_special_tokens=False) + ids, len(ids), (0, len(ids)))
        assert abs(got - float(lp[row, 0])) < 2e-3 * max(1.0, abs(got))
    y = lp[:, 0]
    w, _ = lasso(keep.float(), y, 0.01 * float(y.std()))
    torch.testing.assert_close(fitted.scores[0], w.float())


def test_mask_and_rerender_ablations(model, tok):
    messages, docs, reply, k = copy_cases(1, seed=3)[0]
    kw = dict(response=reply, spans="all", chat_template=SHORT)
    removed = context_attribution(model, tok, messages, docs, **kw)
    masked = context_attribution(model, tok, messages, docs, ablation="mask", **kw)
    rerendered = context_attribution(model, tok, messages, docs, ablation="rerender", **kw)
    assert int(masked.scores[0].argmax()) == int(removed.scores[0].argmax()) == k
    last = len(docs) - 1                                      # no later document to renumber: the same prompt
    assert abs(float(rerendered.scores[0, last]) - float(removed.scores[0, last])) < 1e-3
    assert int(rerendered.scores[0].argmax()) == k


def test_lasso_recovers_a_sparse_linear_model():
    gen = torch.Generator().manual_seed(0)
    X = (torch.rand(64, 10, generator=gen) < 0.5).float()
    w = torch.zeros(10)
    w[2], w[7] = 3.0, -1.5
    y = X @ w + 0.7 + 0.01 * torch.randn(64, generator=gen)
    got, b = lasso(X, y, alpha=0.005)
    assert torch.allclose(got.float(), w, atol=0.05) and abs(b - 0.7) < 0.05


# ------------------------------------------------------------------------------------------- every method
SHORT = ("{{ bos_token }}{% for d in documents %}Document: {{ loop.index0 }}\n{% for k, v in d.items() %}{{ k }}: {{ v }}\n"
         "{% endfor %}{% endfor %}Question: {{ messages[-1]['content'] }}\nAnswer:")


def copy_cases(n: int, seed: int = 5) -> list:
    """Held-out copying questions: 3-5 documents of six random words, the reply repeats one document's words
    (the bundled model's induction heads copy them, so that document is the one its reply depends on)."""
    import random

    from tiny_data import NAMES, WORDS

    r, out = random.Random(seed), []
    for _ in range(n):
        names = r.sample(NAMES, r.randint(3, 5))
        docs = [{"title": f"{name}'s words", "text": " ".join(r.sample(WORDS, 6)) + "."} for name in names]
        k = r.randrange(len(docs))
        out.append(([{"role": "user", "content": f"What are {names[k]}'s words?"}], docs, " " + docs[k]["text"], k))
    return out


def test_ablation_finds_the_document_a_copied_reply_depends_on(model, tok):
    """A template without the long rag preamble (any chat template with documents works): the reply copies one
    document's words, and leaving that document out costs the reply the most log-probability."""
    hits = 0
    for messages, docs, reply, k in copy_cases(10):
        res = context_attribution(model, tok, messages, docs, response=reply, spans="all", chat_template=SHORT)
        hits += int(res.scores[0].argmax()) == k
    assert hits >= 8, f"source first in {hits}/10"


@pytest.mark.parametrize("method", ["ablation", "attention", "gradient"])
def test_true_source_document_ranks_first(model, tok, method):
    cases = held_out(10, "single")
    hits = 0
    for ex in cases:
        res = context_attribution(model, tok, ex["messages"], ex["documents"], response=ex["response"],
                                  method=method, spans="all")
        assert res.scores.shape == (1, len(ex["documents"])) and res.scores.dtype == torch.float32
        hits += int(res.scores[0].argmax()) == ex["sources"][0]
    assert hits >= 0.8 * len(cases), f"{method}: source first in {hits}/{len(cases)}"


def test_multi_sentence_spans_shapes_and_citations(model, tok):
    ex = held_out(1, "two")[0]
    res = context_attribution(model, tok, ex["messages"], ex["documents"], response=ex["response"],
                              method="attention")
    labels = [s.label for s in res.spans]
    assert labels == ["Relevant Documents", "Cited Documents", "Answer", "Answer", "Grounded answer", "Grounded answer"]
    n = len(ex["documents"])
    assert res.scores.shape == (6, n) and res.model_citations.shape == (6, n)
    assert res.details["per_layer_head"].shape == (6, n, model.cfg.n_layers, model.cfg.n_heads)
    for s in res.spans:                                      # text, characters and tokens agree
        assert res.response[s.start:s.end] == s.text and s.text == s.text.strip()
        assert tok.decode(res.response_ids[s.token_start:s.token_end]).strip() == s.text
    grounded = re.findall(r"<co: (\d)>", ex["response"])
    for row, doc in zip(res.model_citations[4:], grounded):  # each grounded sentence cites its own document
        assert row.nonzero().flatten().tolist() == [int(doc)]
    assert not res.model_citations[:4].any()
    assert res.agreement in (0.0, 0.5, 1.0)
    assert res.agreement == sum(bool(res.model_citations[s, int(res.scores[s].argmax())]) for s in (4, 5)) / 2
    whole = context_attribution(model, tok, ex["messages"], ex["documents"], response=ex["response"],
                                method="gradient", spans="all")
    assert len(whole.spans) == 1 and whole.spans[0].token_start == 0
    assert whole.spans[0].token_end == len(whole.response_ids) and whole.model_citations[0].sum() == 2


def test_generated_reply_and_given_spans(model, tok):
    ex = held_out(1, "single")[0]
    res = context_attribution(model, tok, ex["messages"], ex["documents"], method="attention",
                              spans=[(0, 4)], max_new_tokens=90)
    ids = tok.apply_chat_template(ex["messages"], documents=ex["documents"], chat_template="rag",
                                  add_generation_prompt=True)
    out = model.generate(torch.tensor([ids]), max_new_tokens=90, do_sample=False, eos_token_id=tok.eos_token_id)
    new = out[0, len(ids):].tolist()
    assert res.response_ids == new[:new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
    assert res.spans[0].text == res.response[:4] and res.spans[0].token_start == 0 and res.prompt_ids == ids


# ------------------------------------------------------------------------------------------- real tokenizer
def test_real_command_r_rag_template_document_ranges(tmp_path):
    folder = SHARED / "command-r"
    if not (folder / "tokenizer.json.gz").is_file():
        pytest.skip(f"real Command-R tokenizer not found at {folder} (third-party data kept beside the repo)")
    (tmp_path / "tokenizer.json").write_bytes(gzip.decompress((folder / "tokenizer.json.gz").read_bytes()))
    (tmp_path / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    real = Tokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "Where do the tallest penguins live?"}]
    for mode in ("accurate", None):
        kw = {} if mode is None else {"citation_mode": mode}
        p = rag_prompt(real, messages, DOCUMENTS, **kw)
        assert p.ids == real.apply_chat_template(messages, documents=DOCUMENTS, chat_template="rag",
                                                 add_generation_prompt=True, **kw)
        assert p.ids[0] == 5 and p.ids[-2:] == [255000, 255007]               # <BOS_TOKEN> ... <|CHATBOT_TOKEN|>
        for i, (r, doc) in enumerate(zip(p.ranges, DOCUMENTS)):
            block = f"\nDocument: {i}\ntitle: {doc['title']}\ntext: {doc['text']}\n"  # the template's layout
            assert r.exact and real.decode(p.ids[r.start:r.end]) == block
        assert p.ranges[0].start == len(real.encode(p.text[:p.text.index("<results>") + 9], add_special_tokens=False))
        after = real.decode(p.ids[p.ranges[-1].end:])
        assert after.startswith("</results><|END_OF_TURN_TOKEN|>")
    reply = "Relevant Documents: 0,1\nCited Documents: 0,1\nGrounded answer: <co: 0>Emperor penguins</co: 0> live in <co: 1>Antarctica</co: 1>."
    cites = parse_citations(reply, 3)
    assert [reply[a:b] for a, b, _ in cites.regions] == ["Emperor penguins", "Antarctica"]
    assert [d for _, _, d in cites.regions] == [[0], [1]] and cites.unknown == []


# ------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_a_clear_error(model, tok):
    messages = [{"role": "user", "content": "Where do emperor penguins live?"}]
    reply = "Relevant Documents: 1\nCited Documents: 1\nAnswer: Antarctica.\nGrounded answer: <co: 1>Antarctica</co: 1>."
    with pytest.raises(ValueError, match="documents"):
        context_attribution(model, tok, messages, [], response=reply)
    with pytest.raises(ValueError, match="documents"):
        context_attribution(model, tok, messages, "Emperor penguins are the tallest.", response=reply)
    with pytest.raises(ValueError, match="not a continuation"):
        context_attribution(model, tok, messages, DOCUMENTS, response="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi")
    other = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    with pytest.raises(ValueError, match="do not continue"):
        context_attribution(model, tok, messages, DOCUMENTS, response=other + [42, 43])
    with pytest.raises(ValueError, match="outside the response"):
        context_attribution(model, tok, messages, DOCUMENTS, response=reply, spans=[(0, len(reply) + 5)])
    with pytest.raises(ValueError, match="not a substring"):
        context_attribution(model, tok, messages, DOCUMENTS, response=reply, spans=["Paris"])
    with pytest.raises(ValueError, match="method"):
        context_attribution(model, tok, messages, DOCUMENTS, response=reply, method="saliency")
    with pytest.raises(ValueError, match="n_ablations"):
        context_attribution(model, tok, messages, DOCUMENTS, response=reply, n_ablations=1)
    with pytest.raises(ValueError, match="empty"):
        context_attribution(model, tok, messages, DOCUMENTS, response="")


# ------------------------------------------------------------------------------------------- widget
def test_context_view_data_and_snapshot(model, tok):
    from workbench.widgets import ContextView

    ex = held_out(1, "two")[0]
    docs = [dict(d) for d in ex["documents"]]
    docs[0]["title"] = "<script>alert(1)</script>"
    results = [context_attribution(model, tok, ex["messages"], docs, response=ex["response"], method=m)
               for m in ("ablation", "attention")]
    view = ContextView(results, title="rag lens")
    data = json.loads(view.data_json)
    assert data["order"] == ["ablation", "attention"] and len(data["spans"]) == len(results[0].spans)
    for m, r in zip(data["order"], results):
        assert data["methods"][m]["ranks"] == r.top_documents()
        assert [s for s, flag in enumerate(data["methods"][m]["disagree"]) if flag] == r.disagreements()
    assert data["citations"] == results[0].model_citations.tolist()
    html = view.to_html()
    assert "<script" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("class='wb-cv-span-block'") == len(results[0].spans) and "cited" in html
    js = (REPO / "workbench" / "widgets" / "static" / "context_view.js").read_text()
    assert "innerHTML" not in js and "http" not in js
    with pytest.raises(ValueError, match="different reply"):
        other = context_attribution(model, tok, ex["messages"], docs, response=ex["response"], method="attention", spans="all")
        ContextView([results[0], other])


# ------------------------------------------------------------------------------------------- ragwire: streaming attention
def test_attention_method_streams_rows_and_equals_full_patterns(model, tok):
    """The attention method (through attention_to_spans) equals the same sums over the explicit path's full
    hook_pattern, within 1e-6; and the document ranges contain spans_from_chat's field-value spans."""
    from workbench.analysis import spans_from_chat
    from workbench.hook_names import act_name
    ex = held_out(1, "two")[0]
    res = context_attribution(model, tok, ex["messages"], ex["documents"], response=ex["response"],
                              method="attention")
    ids = res.prompt_ids + res.response_ids
    _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n.endswith("hook_pattern"))
    P, L, H = len(res.prompt_ids), model.cfg.n_layers, model.cfg.n_heads
    expect = torch.zeros(len(res.spans), len(res.documents), L, H)
    for s, span in enumerate(res.spans):
        for d, r in enumerate(res.document_ranges):
            for layer in range(L):
                rows = cache[act_name("pattern", layer)][0, :, P + span.token_start - 1:P + span.token_end - 1]
                expect[s, d, layer] = rows[:, :, r.start:r.end].sum(-1).mean(-1)   # [head]
    got = res.details["per_layer_head"]
    assert got.shape == expect.shape
    torch.testing.assert_close(got, expect, atol=1e-6, rtol=0)
    torch.testing.assert_close(res.scores, expect.mean(dim=(2, 3)), atol=1e-6, rtol=0)
    assert not torch.equal(res.scores[0], res.scores[-1])            # the spans differ: can fail
    chat_ids, chat_spans = spans_from_chat(tok, ex["messages"], documents=ex["documents"])
    assert chat_ids[0].tolist() == res.prompt_ids
    by_name = {s.name: s for s in chat_spans}
    for r in res.document_ranges:                                    # header + fields  ⊇  field values
        inner = by_name[f"document {r.index}"]
        assert r.start <= inner.start < inner.end <= r.end, (r, inner)
