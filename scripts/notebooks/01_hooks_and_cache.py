# %% [markdown]
# # 01 · Hooks and the activation cache
#
# Every intermediate tensor of `HookedCommandR` passes through a named **hook point**. A hook is a function
# `fn(tensor, hook)` attached to a name: it can read the tensor (return nothing) or replace it (return a new
# tensor of the same shape). Everything in this workbench — caching, patching, ablation, steering, the
# widgets — is built from that one mechanism, with TransformerLens' names.
#
# This notebook: the hook table, `run_with_cache`, `run_with_hooks`, a patch written by hand, and hooks while
# the model generates.

# %%
import os

MODEL = os.environ.get("WORKBENCH_MODEL_PATH", "command-r-tiny")   # or "/models/c4ai-command-r-v01"

# %%
import torch
import torch.nn.functional as F

from workbench import setup_notebook
from workbench.hook_table import format_hook_table

# float32 when small, a real checkpoint in its own dtype over the GPUs; tokenizer; torch seeded
model, tok, cfg = setup_notebook(MODEL)
messages = [{"role": "user", "content": "What is the capital of France?"}]
ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt").to(model.device)
print(ids.shape, "|", tok.decode(ids[0]))

# %% [markdown]
# ## The hook table
#
# `model.hook_table(batch, pos)` lists every hook point with the shape and dtype its tensor will have, without
# running the model (it works on a 104B model built on the `meta` device too). Axis names: `batch`, `pos`
# (query position), `k_pos` (key position), `head` / `kv_head`, `d_head`, `d_model`, `d_mlp`, `vocab`.
#
# How to read it for Command-R:
#
# * `hook_resid_pre` → the block → `hook_resid_post`. The block is **parallel**: one LayerNorm
#   (`ln1.hook_normalized`) feeds both attention and the MLP, and `resid_post = resid_pre + attn_out + mlp_out`.
#   So there is no `hook_resid_mid` and no `ln2`.
# * `ln1.hook_scale` `[batch pos 1]` is the LayerNorm's divisor √(var + ε) in float32. Replacing it with a
#   value cached from another run **freezes the norm**, the usual trick for linear attribution.
# * `attn.hook_q/k/v` are per head; keys and values have `kv_head` heads (grouped-query attention: query head
#   `j` reads KV head `j // (head / kv_head)`). `hook_q_normed/k_normed` exist on QK-norm models (Command-R+),
#   `hook_rot_q/rot_k` on layers with rotary embeddings.
# * `attn.hook_attn_scores` / `attn.hook_pattern` `[batch head q_pos k_pos]`: scaled, masked scores and the
#   softmax. Hooking either switches that layer from fused SDPA to the explicit computation (bit-identical to
#   transformers' eager attention), because the fused kernel never materialises the pattern.
# * `attn.hook_z` `[batch pos head d_head]` is each head's weighted sum of values; `attn.hook_result`
#   `[batch pos head d_model]` is each head's contribution to the residual stream (computed only when used).
# * `mlp.hook_pre` (gate), `hook_pre_linear` (up), `hook_post` (silu(gate)·up), then `hook_mlp_out`.
# * `hook_logits_unscaled` and `hook_logits` = unscaled × `logit_scale`.
#
# Layer 0 and the model-level hooks (the other layers repeat layer 0's rows):

# %%
rows = model.hook_table(batch=1, pos=ids.shape[1])
print(f"{len(rows)} hook points in total\n")
print(format_hook_table([r for r in rows if r["layer"] in (None, 0)]))

# %% [markdown]
# ## `run_with_cache`
#
# Runs the model once and keeps the activations, by default every hook; `names_filter` (a name, a list or a
# predicate) keeps fewer, which matters on a real model (one `[batch head pos pos]` pattern of a 35B model at
# 8k tokens is 8.6 GB). The cache accepts full names or TransformerLens shorthands: `cache["pattern", 0]` is
# `blocks.0.attn.hook_pattern`, `cache["resid_post", -1]` the last layer's.

# %%
logits, cache = model.run_with_cache(ids)
print(cache)
print("pattern, layer 0:", tuple(cache["pattern", 0].shape), "  z, layer 0:", tuple(cache["z", 0].shape))
assert torch.equal(logits, cache["hook_logits"])
# resid_post really is resid_pre + attention + MLP (the parallel block)
x = cache["resid_pre", 1]
rebuilt = cache["resid_pre", 0] + cache["attn_out", 0] + cache["mlp_out", 0]
print("resid_pre 1 == resid_pre 0 + attn_out 0 + mlp_out 0:", torch.equal(x, rebuilt))
assert torch.equal(x, rebuilt)
# the pattern rows sum to one, and nothing attends to the future
p = cache["pattern", 0][0].float()
print("rows sum to 1:", torch.allclose(p.sum(-1), torch.ones(p.shape[:-1])),
      "| causal:", bool((p.triu(1) == 0).all()))

# %% [markdown]
# Caching every hook changed how the forward was computed, in two ways that only show in the last bits:
#
# * listening to `hook_pattern` makes every layer take the **explicit** attention path, while plain
#   `model(ids)` uses fused SDPA, which sums in another order;
# * listening to `hook_result` makes `hook_attn_out` the **sum of the per-head results** instead of one matmul.
#
# The numbers agree to float rounding, not bit for bit. With the explicit path forced (`model.attn_impl`) and
# without `hook_result`, a cached run and a plain run are identical. (So patching experiments should cache only
# what they patch: see notebook 03.)

# %%
with torch.no_grad():
    fused = model(ids)
print("max |explicit − fused| logit:", (logits.float() - fused.float()).abs().max().item())
model.attn_impl = "explicit"                  # force the explicit path everywhere
try:
    no_result, _ = model.run_with_cache(ids, names_filter=lambda name: not name.endswith("hook_result"))
    with torch.no_grad():
        same = torch.equal(model(ids), no_result)
    print("explicit path, cache without hook_result: bit-identical to the plain forward:", same)
    assert same
finally:
    model.attn_impl = "auto"                  # back to fused SDPA wherever no pattern is hooked

# %% [markdown]
# Command-R predicts the next token from the last position; the cache also gives the LayerNorm's scale and
# the final residual, so the logits can be rebuilt by hand: `ln_final`, then `model.W_U`, which includes
# `logit_scale` (as TransformerLens arithmetic expects; the stored tied weight is `model.W_U_raw`).

# %%
from workbench.model import layer_norm_fp32

resid = cache["resid_post", -1][0, -1]                                  # [d_model]
normed = layer_norm_fp32(resid, model.ln_final.weight, cfg.layer_norm_eps)
by_hand = normed @ model.W_U                        # W_U = W_E.T * logit_scale (W_U_raw = W_E.T, tied)
print("rebuilt logits equal:", torch.allclose(by_hand.float(), logits[0, -1].float(), atol=1e-4))
top = logits[0, -1].float().softmax(-1).topk(5)
print("next token:", [(tok.decode([i]), round(p, 3)) for i, p in zip(top.indices.tolist(), top.values.tolist())])

# %% [markdown]
# ## `run_with_hooks`: reading and editing
#
# A hook that returns `None` only reads; one that returns a tensor replaces the activation for the rest of
# the forward. `hook.name` and `hook.layer` say where it fired. Hooks are removed when the call returns, even
# after an exception. Here: zero each attention head of the last layer in turn (on `hook_z`) and measure how
# much the model's loss on a short text gets worse.

# %%
text_ids = torch.tensor([tok.encode("The capital of France is Paris. The capital of Italy is Rome. "
                                    "The sky is blue. The grass is green.")], device=model.device)


def loss_of(logits):
    return F.cross_entropy(logits[0, :-1].float(), text_ids[0, 1:]).item()


with torch.no_grad():
    base = loss_of(model(text_ids))
last = cfg.n_layers - 1
deltas = []
for h in range(cfg.n_heads):
    def zero_head(z, hook, h=h):           # z: [batch pos head d_head]
        z = z.clone()
        z[:, :, h] = 0
        return z
    deltas.append(loss_of(model.run_with_hooks(text_ids, fwd_hooks=[(f"blocks.{last}.attn.hook_z", zero_head)])) - base)
print(f"loss {base:.3f}; change when zeroing each head of layer {last}:")
print("  ".join(f"H{h} {d:+.3f}" for h, d in enumerate(deltas)))

# %% [markdown]
# A reading hook with a predicate instead of a name: the norm of the residual stream at every layer.

# %%
norms = {}


def record_norm(x, hook):
    norms[hook.name] = x[0].float().norm(dim=-1).mean().item()


model.run_with_hooks(text_ids, fwd_hooks=[(lambda name: name.endswith("hook_resid_post"), record_norm)])
for name, n in norms.items():
    print(f"{name:<28} mean ‖x‖ = {n:8.2f}")

# %% [markdown]
# ## A patch by hand
#
# Activation patching asks: *if this one activation had its value from another prompt, would the output
# change?* Take a clean prompt and a corrupted one that differ in a single token, cache the clean run, and
# paste one clean activation into the corrupted run. Notebook 03 does this systematically with the `hooks`
# package; here is the whole idea in a few lines.

# %%
clean = torch.tensor([tok.encode("The capital of France is")], device=model.device)
corrupt = torch.tensor([tok.encode("The capital of Italy is")], device=model.device)
assert clean.shape == corrupt.shape, "patching position by position needs prompts of the same length"
diff_pos = (clean[0] != corrupt[0]).nonzero()[:, 0].tolist()
paris = tok.encode(" Paris", add_special_tokens=False)[0]
rome = tok.encode(" Rome", add_special_tokens=False)[0]
print("tokens differ at", diff_pos, [tok.decode([i]) for i in clean[0, diff_pos].tolist()],
      "vs", [tok.decode([i]) for i in corrupt[0, diff_pos].tolist()])


def paris_minus_rome(logits):
    return (logits[0, -1, paris] - logits[0, -1, rome]).item()


_, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
with torch.no_grad():
    print(f"logit(Paris) − logit(Rome): clean {paris_minus_rome(model(clean)):+.3f}, "
          f"corrupted {paris_minus_rome(model(corrupt)):+.3f}")

pos = diff_pos[0]
for layer in range(cfg.n_layers):
    name = f"blocks.{layer}.hook_resid_pre"

    def paste_clean(resid, hook):             # resid: [batch pos d_model]
        resid = resid.clone()
        resid[:, pos] = clean_cache[hook.name][:, pos]
        return resid

    patched = model.run_with_hooks(corrupt, fwd_hooks=[(name, paste_clean)])
    print(f"patch resid_pre {layer} at position {pos}: {paris_minus_rome(patched):+.3f}")

# %% [markdown]
# Patching the country's residual stream before layer 0 restores the clean answer completely (everything
# downstream is recomputed from it). Where the number drops back towards the corrupted value, the
# information has already moved to other positions — for a trained model, into the last position.

# %% [markdown]
# ## Hooks during generation
#
# Hooks passed to `generate(fwd_hooks=...)` stay attached for the whole generation and fire on the prefill
# and on every decode step. `hook.ctx` tells them where they are: `hook.ctx.step` is 0 for the prefill (all
# prompt positions at once) and 1, 2, … for each new token (one position, the rest comes from the KV cache);
# `hook.ctx.positions` are the absolute positions of this forward. After `generate`, no hook is left.

# %%
seen = []


def log_step(resid, hook):
    seen.append((hook.ctx.step, resid.shape[1], hook.ctx.positions[0].tolist()))


out = model.generate(ids, max_new_tokens=5, fwd_hooks=[("blocks.0.hook_resid_pre", log_step)])
for step, n_pos, positions in seen:
    print(f"step {step}: {n_pos:2d} positions {positions if n_pos < 4 else positions[:2] + ['…'] + positions[-1:]}")
print("hook points with a hook still attached:", [n for n, hp in model.hook_dict.items() if hp.has_hooks])
print(repr(tok.decode(out[0, ids.shape[1]:])))

# %% [markdown]
# `capture=` with `on_step=` hands over each step's activations, for the new positions only, with the
# distribution the token was drawn from: the basis of the live widgets in notebook 04. A hook can also
# *change* generation: below, the attention of every head in layer 0 is zeroed for generated tokens only
# (`hook.ctx.step >= 1`), leaving the prompt's prefill untouched.

# %%
def on_step(info):
    resid = info.activations[f"blocks.{last}.hook_resid_post"]
    print(f"step {info.step}: token {tok.decode(info.new_tokens.tolist())!r:>14}  "
          f"resid {tuple(resid.shape)}  p(top) {info.top_probs[0, 0].item():.2f}")


_ = model.generate(ids, max_new_tokens=4, capture=f"blocks.{last}.hook_resid_post", on_step=on_step)


def silence_new(z, hook):
    if hook.ctx.step is not None and hook.ctx.step >= 1:
        return torch.zeros_like(z)


steered = model.generate(ids, max_new_tokens=12, fwd_hooks=[("blocks.0.attn.hook_z", silence_new)])
plain = model.generate(ids, max_new_tokens=12)
print("plain:   ", repr(tok.decode(plain[0, ids.shape[1]:])))
print("no attn: ", repr(tok.decode(steered[0, ids.shape[1]:])))
