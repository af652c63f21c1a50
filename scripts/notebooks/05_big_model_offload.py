# %% [markdown]
# # 05 · Planning and running the big models: memory, GPUs, CPU and disk
#
# Command-R (35B), Command-R+ (104B) and Command A (111B) do not fit on one GPU in 16-bit precision. This
# notebook plans a run before anything is downloaded or loaded (`estimate_memory`, a device map on the `meta`
# device), explains the loading options, and then uses exactly the same calls on the tiny model with CPU +
# disk offload, so the whole path runs on any machine and can be checked: offloaded logits equal the plain
# load's, and hooks keep working.

# %%
import os

MODEL = os.environ.get("WORKBENCH_MODEL_PATH", "command-r-tiny")   # or "/models/c4ai-command-r-v01"

# %%
import logging
import tempfile
from collections import Counter

import torch

from workbench import CommandRConfig, HookedCommandR, Tokenizer, estimate_memory, setup_notebook
from workbench.memory import fmt_bytes

info = setup_notebook(MODEL, load=False)   # torch seeded; only the config is read here

logging.getLogger("accelerate").setLevel(logging.ERROR)   # planning for GPUs this machine may not have

# %% [markdown]
# ## How much memory?
#
# `estimate_memory(preset or config or folder, dtype, batch, seq_len)` counts from the config alone:
#
# * **weights** — parameters × bytes per element (2 for bfloat16/float16; about 0.53 for 4-bit NF4 including
#   its scales, with embeddings and norms kept in 16 bit);
# * **KV cache** — keys and values of every layer for every token (Command-R v01 has no grouped-query
#   attention: 64 KV heads, which makes its cache 8× larger per token than the 08-2024 release's);
#   `cohere2` sliding layers keep only the last `W − 1` positions;
# * **attention patterns** — one `[batch head q_pos k_pos]` tensor per layer, which the fused attention never
#   builds but `hook_pattern` does: at long contexts, cache patterns of a few layers only.

# %%
for preset in ("command-r-v01", "command-r-08-2024", "command-r-plus", "command-a-03-2025"):
    print(estimate_memory(preset, dtype="bfloat16", batch=1, seq_len=8192), end="\n\n")

# %%
print(f"{'model':<22} {'bf16 weights':>13} {'nf4 weights':>12} {'KV @ 32k tokens':>16}")
for preset in ("command-r-v01", "command-r-08-2024", "command-r-plus", "command-a-03-2025", "command-r7b-12-2024"):
    bf16 = estimate_memory(preset, dtype="bfloat16", seq_len=32768)
    nf4 = estimate_memory(preset, dtype="bfloat16", seq_len=32768, weights="nf4")
    print(f"{preset:<22} {fmt_bytes(bf16.weight_bytes):>13} {fmt_bytes(nf4.weight_bytes):>12} "
          f"{fmt_bytes(bf16.kv_cache_bytes):>16}")

# %% [markdown]
# ## Where would it go? `device_map` and `max_memory`
#
# `from_pretrained(path, device_map=..., max_memory=..., offload_folder=...)` places whole blocks (a block is
# never split: its attention and MLP share one LayerNorm output) on devices, with accelerate:
#
# * `device_map="auto"` fills GPU 0, then GPU 1, …, then the CPU, then the disk, within `max_memory`
#   (`{0: "70GiB", 1: "70GiB", "cpu": "120GiB"}`; default: what is free). `"balanced"` spreads evenly over the
#   GPUs, `"sequential"` fills them in order. A dict `{"embed": 0, "blocks.0": 0, …, "blocks.63": "cpu",
#   "ln_final": "cpu", "unembed": "cpu"}` places modules by hand.
# * Blocks on `"cpu"` are kept in CPU memory and moved to the GPU for their forward; blocks on `"disk"` are read
#   from disk each forward — from `offload_folder` if given (written once, in the target dtype, to a subfolder
#   per checkpoint and dtype, so models of other weights sharing the folder never overwrite each other's files),
#   otherwise straight from the checkpoint's own safetensors shards. Slow, but it runs.
# * `torch_dtype="auto"` keeps the checkpoint's bfloat16/float16; `quantization_config=QuantizationConfig(
#   load_in_4bit=True)` quantizes the blocks' linear layers while loading (4-bit cannot go to disk).
#
# Loading never materialises the whole model: it is built on the `meta` device and each tensor goes straight
# from the file to its device. The same planning runs here, on `meta`, for Command-R+ on two 80 GB GPUs:

# %%
from workbench.offload import resolve_device_map

with torch.device("meta"):
    plus = HookedCommandR(CommandRConfig.from_preset("command-r-plus"))
plan = resolve_device_map(plus, "auto", {0: "75GiB", 1: "75GiB", "cpu": "100GiB"}, torch.bfloat16)
placed = Counter()
for module, device in plan.items():
    n = sum(p.numel() for p in plus.get_submodule(module).parameters()) if module else 0
    placed[str(device)] += 2 * n                                     # bfloat16: 2 bytes per parameter
for device in ("0", "1", "cpu", "disk"):
    blocks = [int(m.split(".")[1]) for m, d in plan.items() if str(d) == device and m.startswith("blocks.")
              and m.count(".") == 1]
    if placed[device] or blocks:
        span = f"blocks {min(blocks)}–{max(blocks)}" if blocks else "no blocks"
        print(f"{'GPU ' + device if device.isdigit() else device:>5}: {fmt_bytes(placed[device]):>9}  {span}")

# %% [markdown]
# So Command-R+ in bfloat16 does not fit on two 80 GB GPUs: the blocks that spill to the CPU travel to a GPU
# on every forward (slow but exact). In 4-bit (the nf4 column above) it fits on one. The call that does it on
# a real machine:
#
# ```python
# model = HookedCommandR.from_pretrained(
#     "/models/c4ai-command-r-plus", torch_dtype="auto", device_map="auto",
#     max_memory={0: "75GiB", 1: "75GiB", "cpu": "100GiB"}, offload_folder="/scratch/offload")
# model.hf_device_map          # where each block went
# ```
#
# Hooks, `run_with_cache` and `generate` work the same on a dispatched model: activations arrive on whatever
# device their block ran on (`run_with_cache(..., device="cpu")` gathers the cache on the CPU).

# %% [markdown]
# ## The same calls on the tiny model: CPU + disk offload, anywhere
#
# With a CPU budget of 80% of the model's weights, `device_map="auto"` puts the last blocks and the head on
# disk (accelerate keeps room for the largest module it has to bring back from disk). The
# offloaded model must compute exactly what the plain load computes: same code, same weights, same order of
# operations. (With a GPU present it goes on the GPU first; this section then puts it on the CPU and disk
# anyway, so it runs the same everywhere.)

# %%
cfg = info.cfg
if not info.small:
    print(f"{MODEL} has {cfg.n_params / 1e9:.0f}B parameters: this section offloads the bundled tiny model instead")
    MODEL = "command-r-tiny"
    cfg = setup_notebook(MODEL, load=False).cfg
tok = Tokenizer.from_pretrained(MODEL)
ids = tok.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}], add_generation_prompt=True,
                              return_tensors="pt")

plain = HookedCommandR.from_pretrained(MODEL, torch_dtype=torch.float32)
est = estimate_memory(cfg, dtype="float32", seq_len=ids.shape[1])
print(f"{MODEL}: weights {fmt_bytes(est.weight_bytes)} in float32")

offload_dir = tempfile.mkdtemp(prefix="workbench-offload-")
budget = {"cpu": int(0.8 * est.weight_bytes)}
if torch.cuda.is_available():
    budget.update({i: 0 for i in range(torch.cuda.device_count())})    # keep the GPUs out of this demo
offloaded = HookedCommandR.from_pretrained(MODEL, torch_dtype=torch.float32, device_map="auto", max_memory=budget,
                                           offload_folder=offload_dir)
print("device map:", {k: v for k, v in offloaded.hf_device_map.items() if not k.startswith("hook")})
[sub] = os.listdir(offload_dir)                 # one subfolder per checkpoint and dtype
print("files in the offload folder:", sub, len(os.listdir(os.path.join(offload_dir, sub))))

# %%
with torch.no_grad():
    a, b = plain(ids), offloaded(ids)
print("offloaded logits equal to the plain load:", torch.equal(a, b))
assert torch.equal(a, b)

# %% [markdown]
# A hand-written map does the same: here layer 0 on the CPU, the middle layers on disk read **directly from the
# checkpoint's safetensors** (no `offload_folder`: nothing is copied), the last layer and the head on the CPU.

# %%
L = cfg.n_layers
by_hand = {"embed": "cpu", "blocks.0": "cpu", **{f"blocks.{i}": "disk" for i in range(1, L - 1)},
           f"blocks.{L - 1}": "cpu", "ln_final": "cpu", "unembed": "cpu"}
from_shards = HookedCommandR.from_pretrained(MODEL, torch_dtype=torch.float32, device_map=by_hand)
with torch.no_grad():
    same = torch.equal(from_shards(ids), a)
print("disk blocks read from the checkpoint, logits equal:", same)
assert same

# %% [markdown]
# Hooks see real activations on the offloaded model, including `hook_result` (which reads the output matrix
# `W_O` of an offloaded block while it is loaded), and generation works as usual:

# %%
_, cache_plain = plain.run_with_cache(ids)
_, cache_off = offloaded.run_with_cache(ids, device="cpu")
mismatch = [n for n in cache_plain if not torch.equal(cache_plain[n], cache_off[n])]
print(f"{len(cache_plain)} cached activations, mismatches: {mismatch}")
assert not mismatch
g1 = plain.generate(ids, max_new_tokens=10)
g2 = offloaded.generate(ids, max_new_tokens=10)
print("greedy generations equal:", torch.equal(g1, g2), "|", repr(tok.decode(g2[0, ids.shape[1]:])))

# %%
import shutil

del offloaded, from_shards
shutil.rmtree(offload_dir, ignore_errors=True)
