# %% [markdown]
# # 02 · Attention: tokens, patterns, induction heads, local vs global layers
#
# * `TokenView` — how a text is tokenized (byte-level BPE; special tokens; bytes of split characters).
# * `AttentionView` — every head's pattern, one (layer, head) at a time, with thumbnails of all heads.
# * Head scores — finding the model's **previous-token** and **induction** heads on repeated random tokens,
#   and checking with an ablation that the induction head does the copying.
# * `cohere2` (Command R7B, Command A) — what sliding-window layers with rotary and global layers without any
#   positional encoding (NoPE) attend to.
#
# The views are anywidgets: live in JupyterLab, and each also carries a static HTML snapshot, so an
# exported notebook still shows them.

# %%
import os

MODEL = os.environ.get("WORKBENCH_MODEL_PATH", "command-r-tiny")   # or "/models/c4ai-command-r-v01"

# %%
import plotly.graph_objects as go
import torch
import torch.nn.functional as F
from plotly.subplots import make_subplots

from workbench import CommandRConfig, HookedCommandR, setup_notebook
from workbench.widgets import AttentionView, TokenView

# float32 when small, a real checkpoint in its own dtype over the GPUs; tokenizer; torch seeded
model, tok, cfg = setup_notebook(MODEL)

# %% [markdown]
# ## Tokens
#
# Command-R's tokenizer is a byte-level BPE: every text encodes, spaces are part of the following token (shown
# as `·`), digits are split one per token, and a character whose UTF-8 bytes are split across tokens shows its
# bytes (`<0xEC>`) with the character underneath. Special tokens (`<BOS_TOKEN>`, the turn tokens) are styled,
# never interpreted as HTML. Hover a chip for its id, bytes and character span.

# %%
TokenView(tok, "Hello, how are you? 1234 안녕하세요 <b>not bold</b>", title="a mixed text")

# %%
chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                               add_generation_prompt=True, return_tensors="pt")
TokenView(tok, chat, title="a chat prompt")

# %% [markdown]
# ## Attention patterns
#
# `AttentionView(model, tok, text)` runs the model once, caching only the patterns (`hook_pattern`,
# `[batch head q_pos k_pos]`). Rows are queries, columns keys; each row sums to 1 and the upper triangle is empty
# (causal). Click a head thumbnail to select it; click a token to colour the text by that query's attention.
#
# Things to look for: heads that put most of their weight on `<BOS_TOKEN>` (an "attention sink": a place to
# put attention when the head has nothing to do), heads on the diagonal just below the main one (previous
# token), and stripes that jump back to an earlier copy of the current token (induction, next section).

# %%
text = "The cat sat on the mat. The dog sat on the log. The cat sat on the mat."
view = AttentionView(model, tok, text, layer=0, head=0)
view

# %% [markdown]
# The same data, from Python: the average attention each head pays to `<BOS_TOKEN>`.

# %%
ids = torch.tensor([tok.encode(text)], device=model.device)
_, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
to_bos = torch.stack([cache["pattern", layer][0, :, 1:, 0].float().mean(-1) for layer in range(cfg.n_layers)])
for layer, row in enumerate(to_bos.tolist()):
    print(f"layer {layer}: " + " ".join(f"{v:.2f}" for v in row))

# %% [markdown]
# ## Finding previous-token and induction heads
#
# An **induction head** completes patterns: at the second occurrence of `A` in `… A B … A` it attends to the `B`
# that followed the first `A` and copies it. It is found on sequences of random tokens repeated twice, where
# nothing but in-context copying can predict the second half. The scores (`workbench.analysis`) are the mean
# attention from each position of the second repeat to
#
# * **induction**: the token *after* that token's earlier occurrence;
# * **previous token**: the position just before it (`q − 1`). Induction heads need a previous-token head in an
#   earlier layer: it writes "the token before me was `A`" into `B`'s residual stream, which the induction head's
#   keys then match.
#
# A score near 1 means the head does nothing else; random attention over `n` keys would give about `1/n`.

# %%
from workbench.analysis import induction_scores, previous_token_scores, repeated_random_tokens

first_special = tok.convert_tokens_to_ids("<|START_OF_TURN_TOKEN|>")      # ordinary BPE tokens lie below it
rep = repeated_random_tokens(model, seq_len=20, n_seqs=8, seed=0, bos_token_id=tok.bos_token_id,
                             low=8, high=min(first_special, cfg.vocab_size)).to(model.device)
induction = induction_scores(model, tokens=rep)          # [n_layers n_heads]
previous = previous_token_scores(model, tokens=rep)

fig = make_subplots(rows=1, cols=2, subplot_titles=("previous-token score", "induction score"),
                    horizontal_spacing=0.12)
for col, scores in ((1, previous), (2, induction)):
    fig.add_trace(go.Heatmap(z=scores.float().numpy(), zmin=0, zmax=1, colorscale="Blues", showscale=col == 2,
                             x=[f"H{h}" for h in range(cfg.n_heads)], y=[f"L{i}" for i in range(cfg.n_layers)],
                             hovertemplate="%{y} %{x}: %{z:.2f}<extra></extra>"), row=1, col=col)
fig.update_yaxes(autorange="reversed")
fig.update_layout(height=320, width=820, margin=dict(t=40, b=20, l=40, r=20))
fig.show()

ind_layer, ind_head = divmod(int(induction.argmax()), cfg.n_heads)
prev_layer, prev_head = divmod(int(previous.argmax()), cfg.n_heads)
print(f"strongest induction head:      L{ind_layer}H{ind_head}  score {induction.max():.2f}")
print(f"strongest previous-token head: L{prev_layer}H{prev_head}  score {previous.max():.2f}")

# %% [markdown]
# The induction head's pattern on one repeated sequence: in the second half, a stripe one step to the right of
# the diagonal that starts at the first repeat (the "next token of the earlier copy"). The previous-token head
# is the line just below the main diagonal.

# %%
AttentionView(model, tok, rep[0:1], layer=ind_layer, head=ind_head)

# %%
AttentionView(model, tok, rep[0:1], layer=prev_layer, head=prev_head)

# %% [markdown]
# ### Is it really the induction head that copies?
#
# Scores are correlations. The causal check: zero the head's output (`hook_z`) and see whether the model loses
# its ability to predict the second repeat. The loss on the first repeat (unpredictable random tokens) is the
# baseline; a model that copies in context has a much lower loss on the second. Ablating another head of the
# same layer is the control.

# %%
from hooks import ablate_heads

half = (rep.shape[1] - 1) // 2


def repeat_losses(logits):
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), rep[:, 1:].flatten(), reduction="none")
    losses = losses.view(rep.shape[0], -1)                  # [seq pos-1]: loss of predicting token pos+1
    return losses[:, 1:half].mean().item(), losses[:, half + 1:].mean().item()


control = (ind_head + 1) % cfg.n_heads
with torch.no_grad():
    runs = {
        "no ablation": model(rep),
        f"zero L{ind_layer}H{ind_head} (induction)": model.run_with_hooks(rep, fwd_hooks=ablate_heads([(ind_layer, ind_head)])),
        f"zero L{ind_layer}H{control} (control)": model.run_with_hooks(rep, fwd_hooks=ablate_heads([(ind_layer, control)])),
        f"zero L{prev_layer}H{prev_head} (previous-token)": model.run_with_hooks(rep, fwd_hooks=ablate_heads([(prev_layer, prev_head)])),
    }
print(f"{'':<34} loss on repeat 1   loss on repeat 2")
for label, logits in runs.items():
    first, second = repeat_losses(logits)
    print(f"{label:<34} {first:14.2f} {second:18.2f}")

# %% [markdown]
# ## Cohere2: local (sliding-window) and global (NoPE) layers
#
# Command R7B and Command A (`model_type: "cohere2"`) interleave **three sliding-window layers** (each query sees
# itself and the `W − 1` previous tokens, with rotary embeddings) with **one global layer** that sees the whole
# context and has **no positional encoding at all** (NoPE): its queries and keys are used exactly as projected.
# The same hook names apply; `hook_rot_q/rot_k` exist only on the rotating layers, and the hook table says
# which layer is which.
#
# There is no small trained cohere2 model to ship, so this section builds a random one, scaled down from
# R7B's layout (pattern 4, `W = 8` instead of 4096), and looks at what the *architecture* guarantees. The
# same cells work on a real R7B checkpoint loaded with `HookedCommandR.from_pretrained`.

# %%
cfg2 = CommandRConfig.from_dict({
    "model_type": "cohere2", "vocab_size": 512, "hidden_size": 128, "num_hidden_layers": 8,
    "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256, "logit_scale": 0.25,
    "sliding_window": 8,
    "layer_types": ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 3 + ["full_attention"],
})
r7b_mini = HookedCommandR.from_config(cfg2, seed=0)
W = cfg2.sliding_window
for i in range(cfg2.n_layers):
    print(f"layer {i}: {'local, window ' + str(cfg2.layer_window(i)) if cfg2.layer_window(i) else 'global':<17}"
          f" rotary: {cfg2.layer_uses_rope(i)}")
print("hook_rot_q on layer 0:", "blocks.0.attn.hook_rot_q" in r7b_mini.hook_dict,
      "| on layer 3:", "blocks.3.attn.hook_rot_q" in r7b_mini.hook_dict)

# %% [markdown]
# On a 40-token prompt (a random sequence repeated twice), the local layers' patterns are confined to a band of
# width `W` below the diagonal; the global layers see everything. The numbers: the attention mass on keys more
# than `W − 1` positions back (exactly 0 on local layers, by the mask), and the mean distance `q − k` between a
# query and the keys it attends to.

# %%
rep2 = repeated_random_tokens(r7b_mini, seq_len=20, n_seqs=4, seed=1, bos_token_id=5, low=8)
_, cache2 = r7b_mini.run_with_cache(rep2, names_filter=lambda n: n.endswith("hook_pattern"))
T = rep2.shape[1]
q_idx, k_idx = torch.arange(T)[:, None], torch.arange(T)[None, :]
far = (q_idx - k_idx >= W).float()                      # keys outside a sliding window
dist = (q_idx - k_idx).clamp(min=0).float()
for i in range(cfg2.n_layers):
    p = cache2["pattern", i].float()                     # [batch head q k]
    mass_far = (p * far).sum(-1)[:, :, W:].mean().item()
    mean_dist = (p * dist).sum(-1)[:, :, W:].mean().item()
    kind = "local " if cfg2.layer_window(i) else "global"
    assert mass_far == 0.0 or kind == "global"        # the sliding mask, exactly
    print(f"layer {i} {kind}: attention beyond the window {mass_far:5.3f}   mean distance q−k {mean_dist:5.2f}")

fig = make_subplots(rows=1, cols=2, subplot_titles=("layer 0 (local, rotary), head 0", "layer 3 (global, NoPE), head 0"))
for col, layer in ((1, 0), (2, 3)):
    fig.add_trace(go.Heatmap(z=cache2["pattern", layer][0, 0].float().numpy(), colorscale="Blues", showscale=False),
                  row=1, col=col)
fig.update_yaxes(autorange="reversed", title_text="query")
fig.update_xaxes(title_text="key")
fig.update_layout(height=360, width=760, margin=dict(t=40, b=40, l=50, r=20))
fig.show()

# %% [markdown]
# ### What a NoPE layer cannot see
#
# Without rotary, a global layer's score between a query and a key depends only on the two residual vectors:
# nothing in the layer itself knows *where* the key is. So the layer is blind to order except through what earlier
# (rotating, local) layers wrote into the residual stream, plus the causal mask. Two exact consequences, shown on
# a variant whose first layer is global, reading the raw embeddings:
#
# 1. two copies of the same token get **exactly the same score** from any query that sees both;
# 2. shuffling the context before the last token leaves the last token's attention output **unchanged** (up to
#    float summation order): to a NoPE layer over embeddings the context is a bag of tokens.
#
# A rotary layer (the same weights with `layer_types` swapped) fails both.

# %%
def first_layer_variant(kind):
    c = CommandRConfig.from_dict({**cfg2.to_dict(), "num_hidden_layers": 2, "layer_types": [kind, "sliding_attention"],
                                  "sliding_window": 64})
    return HookedCommandR.from_config(c, seed=0)


tokens = torch.tensor([[5, 40, 41, 42, 40, 43, 44, 45]])       # token 40 at positions 1 and 4
perm = torch.tensor([[5, 44, 42, 40, 43, 41, 40, 45]])           # same context shuffled, last token kept
for kind in ("full_attention", "sliding_attention"):
    m = first_layer_variant(kind)
    _, c1 = m.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_attn_scores", "blocks.0.hook_attn_out"])
    _, c2 = m.run_with_cache(perm, names_filter=["blocks.0.hook_attn_out"])
    s = c1["attn_scores", 0][0, :, -1]                             # [head k_pos]: the last query's scores
    same_score = torch.equal(s[:, 1], s[:, 4])
    same_out = torch.allclose(c1["attn_out", 0][0, -1], c2["attn_out", 0][0, -1], atol=1e-6)
    label = "global (NoPE)" if kind == "full_attention" else "local (rotary)"
    assert same_score == same_out == (kind == "full_attention")
    print(f"layer 0 {label:<15}: equal scores for both copies of token 40: {same_score!s:<5}  "
          f"last output unchanged by shuffling: {same_out}")

# %% [markdown]
# In a trained Command A or R7B, this is why the global layers can afford no positional encoding: the local
# layers below them have already mixed position information into every token's residual stream, and the global
# layers retrieve by content over the whole context — the long-range half of the model's job. To look at a
# real one, load it (`HookedCommandR.from_pretrained("/models/c4ai-command-r7b-12-2024", torch_dtype="auto",
# device_map="auto")`) and rerun the two cells above with it in place of `r7b_mini`.
