# %% [markdown]
# # 08 · TransformerLens code on Command-R, and sparse autoencoders
#
# * **TransformerLens idioms run unchanged**: `to_tokens`, `to_str_tokens`, string inputs, `return_type="loss"`,
#   `stop_at_layer`, `cache.remove_batch_dim()`, `model.W_U`, `model.OV` / `model.QK`, and
#   `transformer_lens.patching` / `utils` when transformer-lens is installed (`pip install .[tl]`).
# * **Command-R's differences, said once**: `W_U` includes `logit_scale`, so `ln_final(resid) @ W_U` is the real
#   logit (the stored weight is `W_U_raw`); the block is parallel, so there is no `resid_mid`; GQA key/value
#   weights are repeated per query head in `W_K`/`W_V` (`W_K_kv` is the stored layout).
# * **SAEs at any hook point**: SAELens folders (`cfg.json` + `sae_weights.safetensors`) load without sae-lens;
#   `run_with_saes` / `run_with_cache_with_saes` splice them in; with the error term the model is unchanged bit
#   for bit. The bundled SAE (trained on `command-r-tiny`'s layer-2 residual stream) shows its top features.

# %%
import os

MODEL = os.environ.get("WORKBENCH_MODEL_PATH", "command-r-tiny")   # or "/models/c4ai-command-r-v01"

# %%
import torch
from IPython.display import display

from workbench import CommandRConfig, HookedCommandR
from workbench.loading import resolve_model_path
from workbench.sae import SAE
from workbench.widgets import TokenView

torch.manual_seed(0)
SMALL = CommandRConfig.from_pretrained(resolve_model_path(MODEL)).n_params < 2e9
model = HookedCommandR.from_pretrained(MODEL, **({} if SMALL else {"torch_dtype": "auto", "device_map": "auto"}))
cfg = model.cfg
print(cfg.d_vocab, cfg.n_ctx, cfg.n_key_value_heads, cfg.act_fn, cfg.normalization_type,
      cfg.positional_embedding_type, cfg.parallel_attn_mlp)

# %% [markdown]
# ## Tokens, strings and losses, the TransformerLens way
#
# The model carries its tokenizer (`model.tokenizer`). Strings are encoded without a chat template, with
# `<BOS_TOKEN>` first (`prepend_bos=False` leaves it out). A string goes straight into the forward, and
# `return_type="loss"` is the mean next-token cross-entropy.

# %%
prompt = "The capital of France is"
tokens = model.to_tokens(prompt)
print(model.to_str_tokens(prompt))
print("loss:", model(prompt, return_type="loss").item(), "=", model(tokens, return_type="loss").item())
per_token = model(prompt, return_type="loss", loss_per_token=True)
print([f"{t!r} {l:.2f}" for t, l in zip(model.to_str_tokens(prompt)[1:], per_token[0].tolist())])

# %% [markdown]
# ## Direct logit attribution with `W_U`
#
# TransformerLens' recipe: decompose the final residual, apply the final LayerNorm with its cached scale, and
# project on `W_U[:, Paris] - W_U[:, Rome]`. Because our `W_U` includes `logit_scale`, the pieces add up to the
# model's real logit difference (with the raw tied weight they would be 1/`logit_scale` = 16× too large).

# %%
paris, rome = model.to_single_token(" Paris"), model.to_single_token(" Rome")
logits, cache = model.run_with_cache(prompt)
direction = model.tokens_to_residual_directions(paris) - model.tokens_to_residual_directions(rome)
parts, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
attribution = cache.apply_ln_to_stack(parts, layer=-1, pos_slice=-1) @ direction     # [component batch]
for label, value in zip(labels, attribution[:, 0].tolist()):
    print(f"{label:<10} {value:+.3f}")
print("sum", attribution.sum().item(), "= logit difference", (logits[0, -1, paris] - logits[0, -1, rome]).item())

# %% [markdown]
# ## `stop_at_layer`, a batchless cache, factored OV circuits

# %%
resid = model(prompt, stop_at_layer=2)
_, resid_cache = model.run_with_cache(prompt, names_filter=lambda n: "resid" in n)   # same (fused) attention path
print("stop_at_layer=2 is resid_pre 2, bit for bit:", torch.equal(resid, resid_cache["resid_pre", 2]))
_, single = model.run_with_cache(prompt, remove_batch_dim=True)
print("pattern without batch:", tuple(single["pattern", 0].shape))
OV = model.OV[1]                                       # [head d_model d_model], rank d_head
print(OV, "singular values of head 1.0:", [round(s, 2) for s in OV[0].S[:5].tolist()])

# %% [markdown]
# With transformer-lens installed, its own patching helpers run on our model (here the residual stream,
# corrupting France into Italy).

# %%
try:
    import transformer_lens.patching as patching
except ImportError:
    patching = None
    print("transformer-lens is not installed: pip install .[tl]")
if patching is not None:
    corrupt = model.to_tokens("The capital of Italy is")
    _, clean_cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_pre"))
    metric = lambda lg: lg[0, -1, paris] - lg[0, -1, rome]
    grid = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    print("[layer pos] logit diff after patching:\n", grid.round(decimals=2))

# %% [markdown]
# ## A sparse autoencoder on the residual stream
#
# The bundled SAE reads `blocks.2.hook_resid_post` of `command-r-tiny` (512 ReLU features). Its file records how
# well it reconstructs held-out text; splicing it in with the error term changes nothing, without the error
# term the model runs on the reconstruction.

# %%
sae = SAE.load_from_disk("command-r-tiny-res-l2")
print(sae, {k: round(v, 3) for k, v in sae.cfg.metadata["reconstruction"].items()})
if SMALL and sae.cfg.d_in == cfg.d_model:
    same = model.run_with_saes(prompt, saes=[sae], use_error_term=True)
    print("error term: logits unchanged bit for bit:", torch.equal(same, model(prompt)))
    print("loss clean", model(prompt, return_type="loss").item(),
          "with the reconstruction", model.run_with_saes(prompt, saes=[sae], return_type="loss").item())

# %% [markdown]
# ## Its top features
#
# Feature activations are cached under the SAE's hook names (`blocks.2.hook_resid_post.hook_sae_acts_post`).
# Over a handful of texts, the features that fire most, each with the tokens where it fires hardest.

# %%
texts = ["The capital of France is Paris. The capital of Italy is Rome.", "3 + 4 = 7. 8 - 2 = 6.",
         "A dog says woof. A cat says meow.", "The sky is blue. Grass is green.",
         "Monday Tuesday Wednesday Thursday", "The opposite of hot is cold."]
if SMALL and sae.cfg.d_in == cfg.d_model:
    name = sae.cfg.hook_name + ".hook_sae_acts_post"
    rows = []
    for text in texts:
        _, c = model.run_with_cache_with_saes(text, saes=[sae], use_error_term=True, names_filter=name)
        rows.append((model.to_str_tokens(text), c[name][0]))                # [pos d_sae]
    peak = torch.stack([acts[1:].max(0).values for _, acts in rows]).max(0).values   # skip BOS
    for f in peak.topk(6).indices.tolist():
        hits = sorted(((acts[p, f].item(), toks, p) for toks, acts in rows for p in range(1, len(toks))
                       if acts[p, f] > 0), reverse=True)[:4]
        print(f"feature {f:3d}:", "  ".join(f"{''.join(t[max(1, p - 3):p])}[{t[p]}] {a:.1f}" for a, t, p in hits))

# %% [markdown]
# One text, token by token, with the strongest feature's activation on each chip (`TokenView` shows strings):

# %%
if SMALL and sae.cfg.d_in == cfg.d_model:
    toks, acts = rows[0]
    best = int(acts[1:].max(0).values.argmax())
    print("feature", best)
    display(TokenView(None, [f"{t}|{a:.1f}" for t, a in zip(toks, acts[:, best].tolist())],
                      title=f"feature {best} of {sae.cfg.hook_name}"))
