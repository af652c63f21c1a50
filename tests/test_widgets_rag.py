"""Widgets on a rag prompt (ragwire): AttentionView.from_model builds its heatmap, head scores and minimap from
exact attention rows (no T x T cache) and shades spans_from_chat's spans; ContextView joins link_selection."""

from __future__ import annotations

import json

import pytest
import torch

from workbench import HookedCommandR
from workbench.analysis import attention_rows, context_attribution, spans_from_chat
from workbench.hook_names import act_name
from workbench.tokenizer import Tokenizer
from workbench.widgets import AttentionView, ContextView, TokenView, link_selection
from workbench.widgets._base import from_f16 as _from_f16
from workbench.widgets.attention_data import pool1d

DOCS = [{"title": f"Note {i}", "text": f"Item {i} is stored in room {100 + 7 * i}. It was moved there in {1990 + i}."}
        for i in range(12)]


def from_f16(data: bytes) -> torch.Tensor:
    return _from_f16(data, [len(data) // 2]).float()


MESSAGES = [{"role": "user", "content": "Where is item 7 stored?"}]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained("command-r-tiny")


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return HookedCommandR.from_pretrained("command-r-tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def prompt(model, tok):
    ids, spans = spans_from_chat(tok, MESSAGES, documents=DOCS)
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    return ids, spans, {layer: cache[act_name("pattern", layer)][0] for layer in range(model.cfg.n_layers)}


def test_from_model_minimap_is_the_query_row(model, tok, prompt):
    ids, spans, full = prompt
    T = ids.shape[1]
    assert T > 400
    view = AttentionView.from_model(model, tok, ids, query=-1, spans=spans, layer=1, head=2, window=32)
    assert view.n_tokens == T and view.query == T - 1 and (view.layer, view.head) == (1, 2)
    direct = attention_rows(model, ids, layers=[1], queries=[T - 1])[1][0, 2, 0]       # [T]
    minimap = from_f16(view.minimap)
    assert minimap.numel() == 400
    torch.testing.assert_close(minimap, pool1d(direct, 400).half().float(), atol=0, rtol=0)
    torch.testing.assert_close(direct, full[1][2, T - 1], atol=1e-6, rtol=0)           # the explicit path's row
    assert json.loads(view.spans_json) == [[s.name, s.start, s.end] for s in spans]
    assert any(name.startswith("document") for name, _, _ in json.loads(view.spans_json))
    # the heatmap window: exact rows of the computed queries
    torch.testing.assert_close(view.pattern_slice(), full[1][2, view.q_start:view.q_start + 32,
                                                             view.k_start:view.k_start + 32], atol=1e-6, rtol=0)
    torch.testing.assert_close(from_f16(view.query_row), full[1][2, T - 1].half().float(), atol=1e-3, rtol=0)


def test_from_model_received_profile_and_scores(model, tok, prompt):
    ids, spans, full = prompt
    T = ids.shape[1]
    view = AttentionView.from_model(model, tok, ids, spans=spans, layers=[0, 1], layer=0, head=1, window=24)
    assert view.query == -1 and view.layers == [0, 1]
    rows = full[0][1, T - 24:]                                                          # [24 T]
    seen = (torch.arange(T - 24, T)[:, None] >= torch.arange(T)[None]).sum(0).clamp(min=1)
    expect = pool1d(rows.sum(0) / seen, 400)
    torch.testing.assert_close(from_f16(view.minimap), expect.half().float(), atol=2e-3, rtol=0)
    scores = view.head_scores()
    bos = torch.stack([full[layer][:, T - 24:, 0].mean(-1) for layer in (0, 1)])       # [layer head]
    torch.testing.assert_close(scores["BOS"], bos, atol=1e-5, rtol=0)
    prev = torch.stack([full[layer][:, torch.arange(T - 24, T), torch.arange(T - 25, T - 1)].mean(-1)
                        for layer in (0, 1)])
    torch.testing.assert_close(scores["previous-token"], prev, atol=1e-5, rtol=0)
    view.select(query=T - 5)                                                            # a computed query
    torch.testing.assert_close(from_f16(view.minimap), pool1d(full[0][1, T - 5], 400).half().float(),
                               atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="query=5"):
        AttentionView.from_model(model, tok, ids, query=5, queries=range(T - 4, T))
    with pytest.raises(ValueError, match="spans"):
        AttentionView.from_model(model, tok, ids, spans=[("x", 10, T + 5)])


def test_context_view_links_to_token_and_attention_views(model, tok):
    docs = DOCS[:3]
    reply = ("Relevant Documents: 1\nCited Documents: 1\nAnswer: Item 1 is in room 107.\n"
             "Grounded answer: <co: 1>Item 1 is in room 107</co: 1>.")
    res = context_attribution(model, tok, [{"role": "user", "content": "Where is item 1?"}], docs,
                              response=reply, method="attention")
    ids = res.prompt_ids + res.response_ids
    P = len(res.prompt_ids)
    cv, tv = ContextView([res]), TokenView(tok, ids)
    av = AttentionView.from_model(model, tok, ids, layers=[0], window=16)
    link_selection(cv, tv, av)
    last = len(res.spans) - 1
    cv.selected = last
    start = P + res.spans[last].token_start
    assert cv.position == tv.selected == av.query == start
    assert tok.decode(ids[start:P + res.spans[last].token_end]).strip() == res.spans[last].text
    inside = P + res.spans[2].token_start + 1                                           # a token inside span 2
    assert inside < P + res.spans[2].token_end
    tv.selected = inside
    assert cv.selected == 2 and cv.position == inside and av.query == inside
    tv.selected = 3                                                                      # a prompt token: no span
    assert cv.selected == -1
    cv.selected = -1
    data = json.loads(cv.data_json)
    assert data["prompt_length"] == P and data["spans"][2]["token_start"] == res.spans[2].token_start
