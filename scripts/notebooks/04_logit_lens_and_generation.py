# %% [markdown]
# # 04 · Logit lens, live generation, direct logit attribution, steering
#
# * **Logit lens**: read every layer's residual stream through the model's own head (final LayerNorm, tied
#   unembedding, `logit_scale`) to see when the answer appears.
# * **GenerationView**: watch tokens, attention and the logit lens update while the model generates.
# * **Direct logit attribution**: split the final logit into the contributions of the embedding, every head and
#   every MLP.
# * **Steering**: add a direction to the residual stream while generating.

# %%
import os

MODEL = os.environ.get("WORKBENCH_MODEL_PATH", "command-r-tiny")   # or "/models/c4ai-command-r-v01"

# %%
import plotly.graph_objects as go
import torch

import hooks
from workbench import setup_notebook
from workbench.analysis import direct_logit_attribution, lens_logits, logit_lens
from workbench.widgets import GenerationView, LogitLensView

# float32 when small, a real checkpoint in its own dtype over the GPUs; tokenizer; torch seeded
model, tok, cfg = setup_notebook(MODEL)

# %% [markdown]
# ## The logit lens
#
# The residual stream after layer ℓ is a partial answer. Decoding it with the model's final LayerNorm and
# unembedding shows what the model "would say" if it stopped there. For Command-R the lens must include the
# `logit_scale` multiplication (1/16 for Command-R): without it every probability is wrong. Each residual stream
# is normalised with its **own** LayerNorm statistics.
#
# In the view, rows are residual streams, drawn bottom-up as the stream flows: `resid_pre 0` (the embeddings) is
# the bottom row and `resid_post` of the last layer (the real output) the TOP row. Columns are positions; each
# cell is the top next-token prediction at that point, coloured by its probability (colourbar above the grid;
# linear or log scale). With a `target`, each cell shows that token's rank (`#1` = top) and probability instead,
# and the title names the token and its id (type `Paris` in the box and the view offers ` Paris`, the token
# with the leading space that follows "is").

# %%
prompt = "The capital of France is"
paris = tok.encode(" Paris", add_special_tokens=False)[0]
rome = tok.encode(" Rome", add_special_tokens=False)[0]
LogitLensView(model, tok, prompt, top_k=5, target=paris)

# %% [markdown]
# The numbers behind it: the probability and rank of ` Paris` after each layer, at the last position, printed
# from the first residual to the last. The last line printed (the view's top row, `resid_post` of the last
# layer) is exactly the model's output (checked below).

# %%
ids = torch.tensor([tok.encode(prompt)], device=model.device)
lens = logit_lens(model, ids, top_k=3, target=paris, positions=[-1])
for label, p, rank, top in zip(lens.labels, lens.target_prob[:, 0, 0], lens.target_rank[:, 0, 0], lens.top_ids[:, 0, 0]):
    print(f"{label:<14} p(Paris) {p.item():.3f}  rank {rank.item():5d}   top-3 {[tok.decode([i]) for i in top.tolist()]}")

logits, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith(("hook_resid_post", "hook_logits")))
same = torch.equal(lens_logits(model, cache["resid_post", -1]), cache["hook_logits"])
print("lens of the last resid_post == the model's logits:", same)
assert same
assert int(lens.top_ids[-1, 0, 0, 0]) == int(logits[0, -1].argmax())   # the top row's top-1 is the model's pick

# %% [markdown]
# ## Watching generation live
#
# `GenerationView` runs `model.generate(..., capture=..., on_step=...)`: after the prefill and after every new
# token it receives that step's attention rows and residual streams (for the new position only, the rest is in
# the KV cache) and updates the token strip, the attention view and the logit lens. Display the dashboard in
# one cell, then run it in the next: the page updates while the cell runs (new tokens are appended; frames the
# page has not drawn yet are merged, so it never falls behind). The Stop button works during `run()`; the status
# ends with `done`, `stopped` or `interrupted` (kernel ■). `view.run_async()` generates on a background thread.

# %%
view = GenerationView(model, tok, [{"role": "user", "content": "What is the capital of France?"}],
                      max_new_tokens=16, target=paris)
view

# %%
out = view.run()
print(repr(tok.decode(out[0, len(view.prompt_ids):])))
print(f"{len(view.step_times)} steps; mean time in the view's update per step: "
      f"{1000 * sum(view.step_times) / max(1, len(view.step_times)):.1f} ms")

# %% [markdown]
# ## Direct logit attribution
#
# Command-R's block is parallel and the final LayerNorm is the only non-linearity between the residual stream
# and the logits. Freezing its scale (the value from this very run), the final residual is a *sum* of
# components — embedding, each head's output, each MLP's output — and so is the logit difference
# `logit(Paris) − logit(Rome)`. `direct_logit_attribution` computes each term; they add up to the real logit
# difference. A component with a large positive value pushes the answer directly; indirect effects (a head
# that helps a later head) do not show here — that is what patching (notebook 03) measures.

# %%
dla = direct_logit_attribution(model, ids, answer=paris, wrong=rome)
values = dla.values[:, 0]
print(f"sum of the components {dla.total[0].item():+.4f}  vs  the real logit difference {dla.logit[0].item():+.4f}")
tol = (1e-3 if model.dtype == torch.float32 else 3e-2) * max(1.0, dla.logit.abs().max().item())  # 16-bit logits round
assert torch.allclose(dla.total, dla.logit, atol=tol)
order = values.abs().argsort(descending=True)[:8]
print("largest:", ", ".join(f"{dla.labels[i]} {values[i].item():+.3f}" for i in order.tolist()))

fig = go.Figure(go.Bar(x=dla.labels, y=values.numpy(),
                       marker_color=["#2b6cb0" if v >= 0 else "#c53030" for v in values.tolist()]))
fig.update_layout(title="direct contribution to logit(Paris) − logit(Rome)", height=320, width=900,
                  margin=dict(t=40, b=80, l=50, r=20), xaxis_tickangle=-60)
fig.show()

heads = dla.heads[:, :, 0]                                  # [layer head]
fig = go.Figure(go.Heatmap(z=heads.numpy(), x=[f"H{h}" for h in range(cfg.n_heads)],
                           y=[f"L{i}" for i in range(cfg.n_layers)], colorscale="RdBu", zmid=0))
fig.update_yaxes(autorange="reversed")
fig.update_layout(title="per head", height=260, width=520, margin=dict(t=40, b=30, l=50, r=20))
fig.show()

# %% [markdown]
# ## Steering during generation
#
# A simple steering vector is the difference of the mean residual streams of two sets of prompts, at one layer
# (a "diff-in-means" direction). Adding `coeff × direction` to `resid_pre` of that layer while generating pushes
# the model towards the first set. `hooks.steer(..., where="new")` adds it only at generated positions
# (`hook.ctx.step ≥ 1`), so the prompt is processed normally; `where="all"` steers the prompt too.
#
# Here the direction is "talking about Paris" minus "talking about Rome", taken at the last token of a few
# sentences; then the model answers a question about Italy with and without it.

# %%
layer = cfg.n_layers // 2
name = f"blocks.{layer}.hook_resid_pre"


def mean_resid(texts):
    acts = []
    for t in texts:
        _, c = model.run_with_cache(torch.tensor([tok.encode(t)], device=model.device), names_filter=name)
        acts.append(c[name][0, -1].float())
    return torch.stack(acts).mean(0)


direction = mean_resid(["The capital of France is Paris", "Paris is in France", "I live in Paris"]) \
    - mean_resid(["The capital of Italy is Rome", "Rome is in Italy", "I live in Rome"])
direction = direction / direction.norm()
scale = mean_resid(["The capital of Italy is"]).norm().item()         # a typical residual norm at this layer
print(f"layer {layer}: direction of unit norm; residual norm there ≈ {scale:.1f}")

question = tok.apply_chat_template([{"role": "user", "content": "What is the capital of Italy?"}],
                                   add_generation_prompt=True, return_tensors="pt").to(model.device)
for coeff in (0.0, 0.5 * scale, 1.0 * scale, 2.0 * scale):
    out = model.generate(question, max_new_tokens=12,
                         fwd_hooks=hooks.steer(layer, direction.to(model.dtype), coeff=coeff, where="all"))
    print(f"coeff {coeff:6.1f}: {tok.decode(out[0, question.shape[1]:], skip_special_tokens=True)!r}")

# %% [markdown]
# Steering only the generated tokens, and watching it live: `GenerationView` passes `fwd_hooks` on to
# `generate`, so the dashboard shows the steered run's attention and logit lens.

# %%
steered_view = GenerationView(model, tok, [{"role": "user", "content": "What is the capital of Italy?"}],
                              max_new_tokens=12, target=paris,
                              fwd_hooks=hooks.steer(layer, direction.to(model.dtype), coeff=2.0 * scale, where="new"))
steered_view

# %%
out = steered_view.run()
print(repr(tok.decode(out[0, len(steered_view.prompt_ids):], skip_special_tokens=True)))
