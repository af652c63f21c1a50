# %% [markdown]
# # 03 · Activation patching and ablations
#
# **Activation patching** localises where a model computes something. Run a *clean* prompt and a *corrupted*
# prompt that differs in the one detail that decides the answer; then rerun the corrupted prompt with a single
# activation taken from the clean run. If that one activation brings the clean answer back, it carries the
# information that matters. Sweeping the patch over layers, positions and heads draws a map of the
# computation.
#
# **Ablation** asks the complementary question: remove a component (zero it, replace it by its mean, or by
# its value on another prompt) and see what breaks.
#
# Everything here uses the `hooks` package (`patch_sweep`, `patch_resid`, `ablate_heads`, `knockout`), which
# returns ordinary `(hook name, fn)` pairs for `run_with_hooks` and `generate`.

# %%
import os

MODEL = os.environ.get("WORKBENCH_MODEL_PATH", "command-r-tiny")   # or "/models/c4ai-command-r-v01"

# %%
import plotly.graph_objects as go
import torch

import hooks
from workbench import setup_notebook

# float32 when small, a real checkpoint in its own dtype over the GPUs; tokenizer; torch seeded
model, tok, cfg = setup_notebook(MODEL)


def heatmap(z, x, y, title, zmid=None, height=300):
    """A plotly heatmap of a [len(y), len(x)] tensor; labels made unique (plotly merges equal category labels)."""
    x = [f"{i}:{s}" for i, s in enumerate(x)] if len(set(x)) < len(x) else list(x)
    fig = go.Figure(go.Heatmap(z=z.float().cpu().numpy(), x=x, y=y, colorscale="RdBu", zmid=zmid,
                               hovertemplate="%{y} · %{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, height=height, width=760, margin=dict(t=40, b=40, l=70, r=20))
    return fig

# %% [markdown]
# ## Clean and corrupted prompts
#
# The bundled model has learned a small table of facts ("The capital of France is Paris."). The two prompts
# differ only in the country; the **metric** is the logit difference `logit(Paris) − logit(Rome)` at the last
# position, normalised so that the corrupted run scores 0 and the clean run 1:
#
# `restored = (patched − corrupted) / (clean − corrupted)`.
#
# The prompts must have the same number of tokens, so each position means the same thing in both runs.

# %%
clean_text, corrupt_text, answer, wrong = "The capital of France is", "The capital of Italy is", " Paris", " Rome"
clean = torch.tensor([tok.encode(clean_text)], device=model.device)
corrupt = torch.tensor([tok.encode(corrupt_text)], device=model.device)
assert clean.shape == corrupt.shape, f"prompts differ in length: {clean.shape} vs {corrupt.shape}"
answer_id = tok.encode(answer, add_special_tokens=False)[0]
wrong_id = tok.encode(wrong, add_special_tokens=False)[0]
labels = [p.text for p in tok.token_pieces(clean[0].tolist())]
print("tokens:", labels)

with torch.no_grad():
    clean_logits, corrupt_logits = model(clean), model(corrupt)
for name, logits in (("clean", clean_logits), ("corrupted", corrupt_logits)):
    top = logits[0, -1].float().softmax(-1).topk(5)
    print(f"{name:>9}: " + ", ".join(f"{tok.decode([i])!r} {p:.2f}" for i, p in zip(top.indices.tolist(), top.values.tolist())))

clean_diff = hooks.logit_diff(clean_logits, answer_id, wrong_id).item()
corrupt_diff = hooks.logit_diff(corrupt_logits, answer_id, wrong_id).item()
print(f"logit diff: clean {clean_diff:+.3f}, corrupted {corrupt_diff:+.3f}")


def restored(logits):
    return (hooks.logit_diff(logits, answer_id, wrong_id) - corrupt_diff) / (clean_diff - corrupt_diff)

# %% [markdown]
# ## Patching the residual stream: layer × position
#
# Cache the clean run — **only the hooks that will be patched** (caching `hook_pattern` or `hook_result` would
# switch the attention path and make even a full patch differ from the clean run in the last bits) — then patch
# `resid_pre` of one (layer, position) at a time. `patch_sweep` returns the metric of every run as a grid.
#
# How to read it: at layer 0 only the position that differs matters (the country token). As layers go up, the
# information moves — here to the last position, where the answer is produced. A bright cell at
# (layer ℓ, position p) means "the residual stream at p entering layer ℓ is enough to restore the answer".

# %%
names = lambda n: n.endswith(("hook_resid_pre", "attn.hook_z", "hook_attn_out", "hook_mlp_out"))
_, clean_cache = model.run_with_cache(clean, names_filter=names)

resid_grid = hooks.patch_sweep(model, corrupt, clean_cache, restored, kind="resid_pre")   # [layer pos]
heatmap(resid_grid, labels, [f"resid_pre {i}" for i in range(cfg.n_layers)],
        "restored by patching resid_pre (layer × position)", zmid=0).show()

# %% [markdown]
# Patching *every* position of `resid_pre 0` restores the clean run exactly (the whole input is then clean):

# %%
with torch.no_grad():
    full = model.run_with_hooks(corrupt, fwd_hooks=hooks.patch_resid(clean_cache, layer=0))
print("full patch of resid_pre 0 reproduces the clean logits bit for bit:", torch.equal(full, clean_logits))
assert torch.equal(full, clean_logits)

# %% [markdown]
# ## Which components write the answer: attention and MLP outputs, then heads
#
# Patching a block's `attn_out` or `mlp_out` (all positions at once) asks which layer's attention or MLP output
# carries the difference. Patching one head's `hook_z` narrows attention down to individual heads.

# %%
attn_grid = hooks.patch_sweep(model, corrupt, clean_cache, restored, kind="attn_out", positions=None)   # [layer]
mlp_grid = hooks.patch_sweep(model, corrupt, clean_cache, restored, kind="mlp_out", positions=None)     # [layer]
fig = go.Figure([go.Bar(name="attn_out", x=[f"L{i}" for i in range(cfg.n_layers)], y=attn_grid.numpy()),
                 go.Bar(name="mlp_out", x=[f"L{i}" for i in range(cfg.n_layers)], y=mlp_grid.numpy())])
fig.update_layout(title="restored by patching one layer's attention / MLP output", barmode="group",
                  height=300, width=600, margin=dict(t=40, b=30, l=40, r=20))
fig.show()

head_grid = hooks.patch_sweep(model, corrupt, clean_cache, restored, kind="z")            # [layer head]
heatmap(head_grid, [f"H{h}" for h in range(cfg.n_heads)], [f"L{i}" for i in range(cfg.n_layers)],
        "restored by patching one head's z (all positions)", zmid=0, height=280).show()
best_layer, best_head = divmod(int(head_grid.argmax()), cfg.n_heads)
print(f"most important head: L{best_layer}H{best_head} restores {head_grid.max():.2f}")

# %% [markdown]
# Where does that head read from? Patch it at one position at a time (`positions="all"` sweeps both axes,
# giving `[layer pos head]`; here only its layer):

# %%
per_pos = hooks.patch_sweep(model, corrupt, clean_cache, restored, kind="z", layers=[best_layer],
                            positions="all", heads=[best_head])[0, :, 0]                  # [pos]
print("  ".join(f"{t}:{v:+.2f}" for t, v in zip(labels, per_pos.tolist())))

# %% [markdown]
# (On a 35B model each cell of a sweep is a full forward pass: restrict `layers=` and `positions=` to the
# region the residual sweep points at before sweeping heads.)
#
# ## Ablations
#
# * **Zero ablation** sets a head's output to 0 — simple, but 0 may be far from anything the head ever outputs.
# * **Mean ablation** replaces it by its average over reference prompts: "this head carries no
#   prompt-specific information".
# * **Attention knockout** stops chosen queries from attending to chosen keys (on `hook_attn_scores`, so the
#   remaining attention renormalises): here, the last position may not look at the country token in any layer.
#
# The metric is the clean logit difference after ablating (1.0 = unchanged).

# %%
countries = ["France", "Germany", "Italy", "Spain", "Japan", "Egypt", "Canada", "Russia", "Greece", "Norway"]
reference = [tok.encode(f"The capital of {c} is") for c in countries]
reference = torch.tensor([r for r in reference if len(r) == clean.shape[1]], device=model.device)
means = hooks.compute_means(model, reference, [f"blocks.{best_layer}.attn.hook_z"], over="batch")
print(f"{len(reference)} reference prompts of the same length for the means")


def kept(fwd_hooks):
    with torch.no_grad():
        logits = model.run_with_hooks(clean, fwd_hooks=fwd_hooks)
    return hooks.logit_diff(logits, answer_id, wrong_id).item() / clean_diff


country_pos = (clean[0] != corrupt[0]).nonzero()[0, 0].item()
last = clean.shape[1] - 1
experiments = {
    f"zero L{best_layer}H{best_head}": hooks.ablate_heads([(best_layer, best_head)]),
    f"mean L{best_layer}H{best_head}": hooks.ablate_heads([(best_layer, best_head)], how="mean", source=means),
    f"zero all heads of L{best_layer}": hooks.ablate_heads({best_layer: list(range(cfg.n_heads))}),
    "knockout last → country, all layers": hooks.knockout_hooks(range(cfg.n_layers), queries=[last], keys=[country_pos]),
    "knockout last → BOS, all layers": hooks.knockout_hooks(range(cfg.n_layers), queries=[last], keys=[0]),
}
for label, fwd in experiments.items():
    print(f"{label:<40} logit diff kept: {kept(fwd):+.2f}")

# %% [markdown]
# Reading the table: if knocking out the last position's attention to the country token destroys the answer,
# the answer is fetched there by attention (rather than built earlier at the country position and carried in
# some other way). Whether a single head or several share the work shows in the zero/mean rows; mean ablation
# is usually the gentler and more faithful of the two.

# %% [markdown]
# ## Attribution patching: every cell from one backward pass
#
# Each cell of an exact sweep is a forward pass: a `[layer pos head]` sweep of Command-R v01 (40 layers × 64
# heads) over a 200-token prompt is 512,000 of them. **Attribution patching** (AtP) estimates every cell at once
# from a first-order Taylor expansion around the corrupted run:
#
# `metric(patched) − metric(corrupted) ≈ (a_clean − a_corrupted) · ∂metric/∂a`
#
# One clean forward, one corrupted forward and one backward give `∂metric/∂a` at every hook point.
# `method="ig"` (integrated gradients) averages the gradient along the straight line from the corrupted to the
# clean activation (`steps` points, batched), which follows curvature — a saturated softmax, say — that the
# first-order estimate misses. `attribution_patching` returns the same grid as `patch_sweep` for the same
# arguments, **relative to the corrupted run** (`patch_sweep − metric(corrupted)`).
#
# The task: induction on repeated random tokens. The corrupted prompt replaces the token that the second repeat
# should copy; the metric is the logit difference of the right next token against the corrupting one.

# %%
from workbench.analysis import attribution_patching, repeated_random_tokens

first_special = tok.convert_tokens_to_ids("<|START_OF_TURN_TOKEN|>")      # ordinary BPE tokens lie below it
S = 10
high = min(first_special, cfg.vocab_size)
rep = repeated_random_tokens(model, seq_len=S, n_seqs=4, seed=0, bos_token_id=tok.bos_token_id, low=8, high=high)
other = repeated_random_tokens(model, seq_len=S, n_seqs=4, seed=100, bos_token_id=tok.bos_token_id, low=8, high=high)
ind_clean, ind_answer = rep[:, :-1].to(model.device), rep[:, -1]
ind_corrupt = ind_clean.clone()
ind_corrupt[:, S] = torch.where(other[:, 1] == ind_answer, other[:, 2], other[:, 1]).to(model.device)
ind_wrong = ind_corrupt[:, S].cpu()


def ind_metric(logits):
    return hooks.logit_diff(logits, ind_answer, ind_wrong)


with torch.no_grad():
    ind_base = ind_metric(model(ind_corrupt)).item()
    print(f"logit diff: clean {ind_metric(model(ind_clean)).item():+.2f}, corrupted {ind_base:+.2f}")

maps = {}
for kind in ("z", "resid_pre"):                                      # [layer head], [layer pos]
    names = [hooks.hook_name(kind, i) for i in range(cfg.n_layers)]
    _, ind_cache = model.run_with_cache(ind_clean, names_filter=names)
    exact = hooks.patch_sweep(model, ind_corrupt, ind_cache, ind_metric, kind=kind, batch_size=16) - ind_base
    atp = attribution_patching(model, ind_clean, ind_corrupt, ind_metric, kind=kind)        # 2 forwards, 1 backward
    ig = attribution_patching(model, ind_clean, ind_corrupt, ind_metric, kind=kind, method="ig", steps=8)
    maps[kind] = dict(exact=exact, AtP=atp, IG=ig)
    print(f"{kind:>9}: {exact.numel()} cells; exact patching ran {exact.numel()} patched copies of the prompt")

# %% [markdown]
# Side by side (one colour scale per row). The `[layer head]` maps find the induction heads in layers 2–3; the
# `[layer pos]` maps show the copied token's position carrying the answer until the induction heads move it to
# the last position.

# %%
from plotly.subplots import make_subplots

pos_labels = [f"{i}" for i in range(ind_clean.shape[1])]
for kind, x, title in (("z", [f"H{h}" for h in range(cfg.n_heads)], "hook_z, one head (all positions)"),
                       ("resid_pre", pos_labels, "resid_pre, one position")):
    fig = make_subplots(rows=1, cols=3, subplot_titles=list(maps[kind]), horizontal_spacing=0.06)
    lim = max(m.abs().max().item() for m in maps[kind].values())
    for col, grid in enumerate(maps[kind].values(), start=1):
        fig.add_trace(go.Heatmap(z=grid.numpy(), x=x, y=[f"L{i}" for i in range(cfg.n_layers)], zmin=-lim, zmax=lim,
                                 colorscale="RdBu", showscale=col == 3,
                                 hovertemplate="%{y} %{x}: %{z:.2f}<extra></extra>"), row=1, col=col)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=f"effect on the logit difference: {title}", height=260, width=980,
                      margin=dict(t=60, b=30, l=40, r=20))
    fig.show()


def ranks(x):
    """Ranks of x's cells, ties (the exact zeros before the corrupted position) sharing their mean rank."""
    x = x.flatten().double()
    r = torch.empty_like(x)
    r[x.argsort()] = torch.arange(len(x), dtype=torch.double)
    for v in x.unique():
        r[x == v] = r[x == v].mean()
    return r


def rank_corr(a, b):
    return torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1].item()


for kind, m in maps.items():
    err = {k: ((m[k] - m["exact"]).norm() / m["exact"].norm()).item() for k in ("AtP", "IG")}
    print(f"{kind:>9}: rank correlation with exact  AtP {rank_corr(m['AtP'], m['exact']):.2f}  "
          f"IG {rank_corr(m['IG'], m['exact']):.2f};  relative error  AtP {err['AtP']:.2f}  IG {err['IG']:.2f}")

# %% [markdown]
# AtP ranks the cells well but underestimates the big ones: patching the copied token's residual changes
# attention patterns far from where the gradient was taken. IG's error is several times smaller. (Timings are
# in `bench/bench_attribution.py`: on this model AtP of the `[layer pos head]` grid is tens of times faster than
# the exact sweep; on a 35B model the ratio is the number of cells.) The usual workflow on a big model: rank
# every cell with AtP (or IG), then **verify** the top candidates with exact patching — `verify_top=k` does both
# in one call (the exact runs batched):

# %%
res = attribution_patching(model, ind_clean, ind_corrupt, ind_metric, kind="z", positions="all", verify_top=6)
print(f"clean {res.clean_metric:+.2f}, corrupted {res.corrupted_metric:+.2f}; estimate grid {tuple(res.estimate.shape)}"
      " [layer pos head]")
for (layer, pos, head), value in zip(res.exact.indices.tolist(), res.exact.values.tolist()):
    print(f"  L{layer}H{head} at position {pos:>2}: AtP {res.estimate[layer, pos, head]:+.2f}   exact {value:+.2f}")
