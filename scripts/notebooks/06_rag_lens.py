# %% [markdown]
# # 06 · The RAG lens: which document drove each part of a grounded answer
#
# Command-R was trained for retrieval-augmented generation with citations: its `rag` template lists the
# documents and asks for *relevant documents*, *cited documents*, an *answer* and a *grounded answer* that wraps
# each claim in `<co: i>…</co: i>`. Whether those citations match what the model actually used is an open
# question. `context_attribution` scores every (span of the reply, document) pair three ways and sets the
# scores beside the model's own citations:
#
# * **ablation**: how much the span's log-probability drops when the document is removed (exact
#   leave-one-out; with `n_ablations=k`, a sparse linear surrogate fitted on k random subsets, as ContextCite);
# * **attention**: attention mass from the span's tokens to the document, averaged over layers and heads;
# * **gradient**: gradient × input of the span's log-probability at the embeddings: per token the magnitude
#   |g · x|, summed per document (signed sums cancel inside a document; they are in `details["signed"]`).
#
# The lens works on any reply: the model's own greedy one, or a reply you pass in (a reference answer, another
# model's). The bundled tiny model was fine-tuned for grounded answering on short synthetic documents about people
# (its model card gives its held-out accuracy); when a model's greedy reply is not in the rag format (another
# checkpoint, or a question outside what it knows) this notebook scores a reference reply instead.

# %%
import os

MODEL = os.environ.get("WORKBENCH_MODEL_PATH", "command-r-tiny")   # or "/models/c4ai-command-r-v01"

# %%
import torch

from workbench import setup_notebook
from workbench.analysis import context_attribution
from workbench.analysis.rag_spans import rag_prompt
from workbench.widgets import ContextView

model, tok, cfg = setup_notebook(MODEL)

# %% [markdown]
# ## The `rag` template with documents
#
# The documents go into a system turn between `<results>` and `</results>`. `rag_prompt` renders the template
# and finds each document's tokens by rendering it with the first k documents for every k (no template text is
# hard-coded, so the same code works on the real Command-R template).

# %%
messages = [{"role": "user", "content": "Tell me about Alice."}]
documents = [
    {"title": "Bob's job", "text": "Bob is a baker."},
    {"title": "Alice's home", "text": "Alice lives in Paris."},
    {"title": "Carol's pet", "text": "Carol has a pet owl."},
    {"title": "Alice's music", "text": "Alice plays the violin."},
]
prompt = rag_prompt(tok, messages, documents)
print(len(prompt.ids), "prompt tokens; the documents' token ranges:")
for r in prompt.ranges:
    print(f"  document {r.index}: tokens [{r.start}, {r.end})  {tok.decode(prompt.ids[r.start:r.end])!r}")

# %% [markdown]
# ## The grounded answer
#
# Greedy generation from the rendered prompt. The reply lists the relevant and cited documents, answers, and
# repeats the answer with citation markup.

# %%
ids = torch.tensor([prompt.ids], device=model.device)
out = model.generate(ids, max_new_tokens=120, do_sample=False, eos_token_id=tok.eos_token_id)
reply_ids = out[0, ids.shape[1]:].tolist()
reply_ids = reply_ids[:reply_ids.index(tok.eos_token_id)] if tok.eos_token_id in reply_ids else reply_ids
reply = tok.decode(reply_ids)
print(repr(reply))
if not reply.startswith("Relevant Documents:") or set(reply_ids) & set(tok.added_tokens):
    reply = ("Relevant Documents: 1,3\nCited Documents: 1,3\nAnswer: Alice lives in Paris. Alice plays the violin.\n"
             "Grounded answer: <co: 1>Alice lives in Paris</co: 1>. <co: 3>Alice plays the violin</co: 3>.")
    reply_ids = tok.encode(reply, add_special_tokens=False)
    print("not a grounded reply; scoring this reference reply instead:\n" + reply)

# %% [markdown]
# ## Three methods
#
# Each result has `.scores` `[n_spans, n_documents]`, `.spans` (text, character and token ranges of the reply;
# by default one per sentence, the part labels such as `Answer:` left out), `.model_citations` (what each span
# cites, from the markup) and `.agreement` (how often the top-scored document is one the span cites).
# The ablation method runs the tokens before the first document once and reuses them through the KV cache.

# %%
results = [context_attribution(model, tok, messages, documents, response=reply_ids, method=m)
           for m in ("ablation", "attention", "gradient")]
spans = results[0].spans
print(f"{'span':<46} {'cites':<6} " + " ".join(f"{r.method:>10}" for r in results))
for s, span in enumerate(spans):
    cites = ",".join(str(i) for i in results[0].model_citations[s].nonzero().flatten().tolist()) or "-"
    tops = " ".join(f"{int(r.scores[s].argmax()):>10}" for r in results)
    print(f"{(span.label or '') + ': ' + span.text:<46.46} {cites:<6} {tops}")
print("forward-equivalents of the ablation method:", round(results[0].details["forward_equivalents"], 2))
attn = results[1].details["per_layer_head"]             # [span document layer head]
print("attention breakdown per layer and head:", tuple(attn.shape))

# %% [markdown]
# Hover or click a span: the documents are ranked by each method, shaded by the chosen one, with the model's
# own citations beside them and a warning where a method's top document is not one the span cites.

# %%
view = ContextView(results, title="Tell me about Alice.")
view

# %% [markdown]
# ## The long-context path: named spans and attention without the full pattern
#
# `spans_from_chat` renders the same conversation and names every part: the system preamble, each turn, the
# question and each document's field values (inside the whole document blocks that `rag_prompt` found above,
# which also hold the `Document: i` header). `attention_to_spans` then sums the attention of chosen queries
# over each span in one forward, computing only those queries' rows layer by layer: memory grows with
# queries × prompt, never prompt², so the same call works on a 32k-token prompt. The attention method of
# `context_attribution` uses it too. `AttentionView.from_model` builds a view from exact rows the same way,
# with the spans shaded on its minimap (click to jump).

# %%
from workbench.analysis import attention_to_spans, spans_from_chat
from IPython.display import display

from workbench.widgets import AttentionView, TokenView, link_selection

chat_ids, chat_spans = spans_from_chat(tok, messages, documents=documents)
assert chat_ids[0].tolist() == list(prompt.ids)            # the same rendering as rag_prompt's
full_ids = torch.tensor([list(prompt.ids) + list(reply_ids)], device=model.device)
mass = attention_to_spans(model, full_ids, chat_spans, queries=[-1])   # [layer batch head 1 n_spans]
per_span = mass[:, 0, :, 0].mean(dim=(0, 1))                          # mean over layers and heads
for span, m in zip(chat_spans, per_span.tolist()):
    print(f"{span.name:<12} tokens [{span.start:>3}, {span.end:>3})  attention of the last token {m:.3f}")

# %% [markdown]
# Select a span of the reply in the ContextView and the same tokens are selected in the token strip and the
# attention view (`link_selection`); select a token of the reply there and its span lights up here.

# %%
view_ids = list(prompt.ids) + list(reply_ids)
tokens_view = TokenView(tok, view_ids, title="prompt + reply")
attention_view = AttentionView.from_model(model, tok, view_ids, query=-1, spans=chat_spans, window=32)
linked = ContextView(results, title="linked")
link_selection(linked, tokens_view, attention_view)
display(linked, tokens_view, attention_view)

# %% [markdown]
# ## Citations check
#
# For every span that cites something: is the top document of each method among the cited ones?

# %%
for r in results:
    print(f"{r.method:<10} agreement {r.agreement}  disagreeing spans {[spans[s].text for s in r.disagreements()]}")
grounded = [s for s, span in enumerate(spans) if span.label == "Grounded answer"]
print("grounded claims:", [spans[s].text for s in grounded])

# %% [markdown]
# ## Remove the top document and regenerate
#
# Take the document that the ablation method ranks first for the first grounded claim, remove it and ask
# again: the claim it carried should disappear from the new answer (or be cited elsewhere).

# %%
s = grounded[0] if grounded else 0
top = int(results[0].scores[s].argmax())
print("first grounded span:", spans[s].text, "| top document:", top, documents[top])
fewer = documents[:top] + documents[top + 1:]
again = rag_prompt(tok, messages, fewer)
ids2 = torch.tensor([again.ids], device=model.device)
out2 = model.generate(ids2, max_new_tokens=120, do_sample=False, eos_token_id=tok.eos_token_id)
print(tok.decode(out2[0, ids2.shape[1]:], skip_special_tokens=True))
