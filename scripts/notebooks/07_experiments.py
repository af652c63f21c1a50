# %% [markdown]
# # 07 · Experiments over datasets: activations on disk, a linear probe, Ray
#
# Interpretability results come from datasets of prompts, not one prompt. `workbench.experiments` runs a model
# over many prompts in **length-bucketed, left-padded batches**, writes what it records to **sharded safetensors
# files plus a manifest** in a folder, **resumes** a killed run where it stopped, and spreads the shards over
# **Ray** workers (one model per GPU, or per few CPU cores) when one process is not enough.
#
# This notebook: collect residual-stream activations of a small dataset, read them back with
# `ActivationDataset`, train a linear probe on them, compute a per-prompt metric with `map_prompts`, and run the
# same collection with `backend="ray"`.

# %%
import os

MODEL = os.environ.get("WORKBENCH_MODEL_PATH", "command-r-tiny")   # or "/models/c4ai-command-r-v01"

# %%
import random
import tempfile
import time

import torch

from workbench import CommandRConfig, HookedCommandR, Tokenizer
from workbench.experiments import collect_activations, map_prompts
from workbench.loading import resolve_model_path

torch.manual_seed(0)
SMALL = CommandRConfig.from_pretrained(resolve_model_path(MODEL)).n_params < 2e9
# float32 for a small model (exact and fast on a CPU); a real checkpoint in its own dtype over the GPUs
LOAD = {} if SMALL else {"torch_dtype": "auto", "device_map": "auto"}
model = HookedCommandR.from_pretrained(MODEL, **LOAD)
tok = Tokenizer.from_pretrained(MODEL)
cfg = model.cfg
WORK = tempfile.mkdtemp(prefix="experiments-")


def resid(layer: int) -> str:
    # hook name of a block's output (the residual stream after block `layer`)
    return f"blocks.{layer}.hook_resid_post"


# %% [markdown]
# ## A small dataset
#
# Plain-text sentences of the kinds the tiny model was trained on: facts, colours and small sums. Real work would
# pass a list of strings, token-id lists or a `datasets.Dataset` column (e.g. `ds["text"]`) just the same.

# %%
rng = random.Random(0)
things = ["sky", "grass", "snow", "coal", "tomato", "lemon", "sea", "leaf", "milk", "night", "frog", "plum"]
colours = ["blue", "green", "white", "black", "red", "yellow", "blue", "green", "white", "black", "green", "purple"]
texts = []
for _ in range(240):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    i = rng.randrange(len(things))
    parts = [f"The {things[i]} is {colours[i]}.", f"{a} + {b} = {a + b}.", f"I have {a} {things[i]}s."]
    rng.shuffle(parts)
    texts.append(" ".join(parts[: rng.randint(1, 3)]))
print(len(texts), "prompts, e.g.", texts[:3])

# %% [markdown]
# ## Collect activations
#
# `collect_activations(model, inputs, hook_names, out_dir)` tokenizes the strings with the model's tokenizer,
# sorts prompts by length into batches (little padding), runs each batch once with the hooks attached, and keeps
# only real positions. Each shard is written under a temporary name and renamed when complete; `manifest.json`
# records the model's config and weights fingerprints, the hooks, and where every prompt lives.

# %%
LAYERS = [0, 1, cfg.n_layers - 1]
HOOKS = ["hook_embed"] + [resid(layer) for layer in LAYERS]
out_dir = os.path.join(WORK, "resid")
start = time.perf_counter()
ds = collect_activations(model, texts, HOOKS, out_dir, batch_size=16, tokenizer=tok, progress=False)
print(f"{len(ds)} prompts, {ds.n_rows} token rows in {time.perf_counter() - start:.1f} s;",
      len(ds.manifest["shards"]), "shards:", sorted(os.listdir(out_dir))[:3], "...")
print("weights fingerprint", ds.manifest["model"]["weights_fingerprint"][:16], "| tensors", ds.manifest["tensors"])

# %% [markdown]
# Reading back is memory-mapped: `ds[i]` reads prompt i's rows from its shard, nothing else. Calling
# `collect_activations` again with the same folder finds every shard finished and computes nothing (after a crash
# it would compute only the missing shards); another model, hook list or prompt list is refused before any work.

# %%
x = ds[0]
print({k: tuple(v.shape) for k, v in x.items()}, "| tokens:", tok.decode(ds.tokens(0)))
again = collect_activations(model, texts, HOOKS, out_dir, batch_size=16, tokenizer=tok, progress=False)
print("second call:", again.last_run["computed"], "computed,", len(again.last_run["skipped"]), "shards skipped")
try:
    collect_activations(model, texts, HOOKS[:2], out_dir, tokenizer=tok, progress=False)
except ValueError as e:
    print("refused:", str(e)[:110], "...")

# %% [markdown]
# ## A linear probe: was the previous token a digit?
#
# Whether the *current* token is a digit can be read off the embedding. Whether the *previous* one was can only be
# guessed from the current token (a digit is often followed by " " or " +"); the rest has to be moved to this
# position by attention. A logistic-regression probe per hook, trained on the first 180 prompts and tested on the
# other 60, shows how much each depth of the residual stream carries (compare with always answering "no").
# `iter_batches` yields shuffled rows (one per stored token) with their `tokens`, `prompt` and `position`.

# %%
digit_ids = torch.tensor([i for i in range(len(tok)) if tok.decode([i]).strip().isdigit()])
prompt_tokens = [ds.tokens(i) for i in range(len(ds))]


def previous_is_digit(prompt: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    prev = torch.stack([prompt_tokens[p][max(q - 1, 0)] for p, q in zip(prompt.tolist(), position.tolist())])
    return torch.isin(prev, digit_ids).float() * (position > 0)


def train_probe(hook: str, epochs: int = 3, split: int = 180):
    probe = torch.nn.Linear(cfg.d_model, 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
    for epoch in range(epochs):
        for rows in ds.iter_batches(256, shuffle=True, seed=epoch, names=[hook]):
            keep = rows["prompt"] < split
            x, y = rows[hook][keep].float(), previous_is_digit(rows["prompt"][keep], rows["position"][keep])
            x = x / x.norm(dim=-1, keepdim=True)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(probe(x)[:, 0], y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    right = total = positives = 0
    with torch.no_grad():
        for rows in ds.iter_batches(1024, names=[hook]):
            keep = rows["prompt"] >= split
            x, y = rows[hook][keep].float(), previous_is_digit(rows["prompt"][keep], rows["position"][keep])
            pred = (probe(x / x.norm(dim=-1, keepdim=True))[:, 0] > 0).float()
            right, total, positives = right + int((pred == y).sum()), total + len(y), positives + int(y.sum())
    return right / total, 1 - positives / total


for hook in HOOKS:
    acc, base = train_probe(hook)
    print(f"{hook:<26} test accuracy {acc:.3f}   (always 'no': {base:.3f})")

# %% [markdown]
# ## Any per-prompt computation: `map_prompts`
#
# `map_prompts(model, inputs, fn, out_dir)` is the general form: `fn(model, batch)` gets a left-padded `Batch`
# (`input_ids`, `attention_mask`, `position_ids`, `prompt_indices`, `lengths`) and returns one value per prompt
# for each name. Same batching, shards, resume and backends. Here: each prompt's mean next-token loss.

# %%
def mean_loss(model, batch):
    with torch.no_grad():
        logits = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]   # [batch pos-1]
    width = logp.shape[1]
    return {"loss": [-logp[b, width - (int(n) - 1):].mean() if n > 1 else torch.tensor(0.0)
                     for b, n in enumerate(batch.lengths)]}


losses = map_prompts(model, texts, mean_loss, os.path.join(WORK, "loss"), batch_size=16, tokenizer=tok,
                     progress=False).stack("loss")
for i in losses.argsort(descending=True)[:3].tolist():
    print(f"{losses[i]:.2f}  {texts[i]!r}")
print(f"mean over the dataset: {losses.mean():.3f}")

# %% [markdown]
# ## The same call on Ray
#
# With `backend="ray"` each of `num_workers` Ray actors loads the model once (by name or path, with
# `model_kwargs`), takes one GPU when the cluster has GPUs (else a fixed number of CPU threads), and computes
# shards handed out by the driver; a shard whose worker dies is retried on another. `ray_address="auto"` joins a
# running cluster (then `out_dir` must be on a filesystem every node sees). Ray is an optional extra:
# `pip install "commandr-workbench[distributed]"`. The results equal the local run's.

# %%
try:
    import ray
except ImportError:
    ray = None
    print('skipped: Ray is not installed (pip install "commandr-workbench[distributed]")')
else:
    try:                         # a local instance with 2 CPUs (ray_address="auto" would join a cluster instead)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as e:       # e.g. Ray's 30 s start-up limit on an overloaded machine
        ray.shutdown()
        ray = None
        print(f"skipped: a local Ray instance could not start here ({str(e)[:100]})")
if ray is not None:
    subset = texts[:48]
    local = collect_activations(model, subset, [resid(1)], os.path.join(WORK, "local"), batch_size=8,
                                tokenizer=tok, progress=False)
    start = time.perf_counter()
    dist = collect_activations(MODEL, subset, [resid(1)], os.path.join(WORK, "ray"), batch_size=8,
                               backend="ray", num_workers=2, model_kwargs=LOAD, progress=False)
    ray.shutdown()
    same = all(torch.equal(local[i][resid(1)], dist[i][resid(1)]) for i in range(len(subset)))
    print(f"Ray, 2 workers: {len(dist)} prompts in {time.perf_counter() - start:.1f} s (start-up included); "
          f"workers that computed shards: {dist.last_run['workers']}; identical to local: {same}")
