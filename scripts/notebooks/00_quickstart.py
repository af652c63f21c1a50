# %% [markdown]
# # 00 · Quickstart: the Command-R documentation's examples, with the workbench
#
# This notebook walks through the examples of the Command-R model card and the transformers
# documentation step by step, but with this project's classes: `HookedCommandR` instead of
# `AutoModelForCausalLM`, `Tokenizer` instead of `AutoTokenizer`. Every call has the same name and the
# same arguments, and gives the same numbers (the test suite checks the model against transformers bit
# for bit).
#
# It runs on the bundled `command-r-tiny` (3M parameters, trained on a few toy tasks, in the real
# Command-R format), so it finishes in seconds on any CPU. To run it on a real checkpoint, change the
# one line below (or set `WORKBENCH_MODEL_PATH`): e.g. `/models/c4ai-command-r-v01`.

# %%
import os

MODEL = os.environ.get("WORKBENCH_MODEL_PATH", "command-r-tiny")   # or "/models/c4ai-command-r-v01"

# %%
import torch

from workbench import CommandRConfig, HookedCommandR, Tokenizer, setup_notebook

info = setup_notebook(MODEL, load=False)            # torch seeded; nothing loaded yet
path, cfg = info.path, info.cfg                     # the checkpoint folder, its config.json
SMALL = info.small                                  # small enough to load several copies on a laptop
print(f"{MODEL}: {cfg.n_params / 1e6:.1f}M parameters, {cfg.n_layers} layers, d_model {cfg.d_model}, "
      f"{cfg.n_heads} heads ({cfg.n_kv_heads} KV heads), logit_scale {cfg.logit_scale}, "
      f"QK-norm {cfg.use_qk_norm}, checkpoint dtype {cfg.torch_dtype}")

# %% [markdown]
# ## What makes Command-R different
#
# The architecture (`CohereForCausalLM`) looks like Llama at first glance, with a few differences
# that matter for interpretability work:
#
# * **Parallel block, one LayerNorm.** Each layer computes `h = LN(x)` once and adds both branches:
#   `x + attn(h) + mlp(h)`. There is no `resid_mid` and no second norm.
# * **A real LayerNorm** (mean-subtracting, no bias), computed in float32, not an RMSNorm.
# * **Interleaved rotary embeddings**: adjacent pairs `(x0, x1), (x2, x3), …` rotate together
#   (GPT-J style), not the two halves of the head as in Llama.
# * **`logit_scale`**: the logits are multiplied by 1/16 (Command-R), 0.833 (Command-R+) or 1/4 (Command
#   R7B and Command A). Forget it and every probability is wrong, although the argmax is not.
# * **Tied embeddings**: the unembedding *is* the embedding matrix.
# * **QK-norm** on Command-R+: a per-head LayerNorm on queries and keys, before rotary.
# * The newer `cohere2` models (R7B, Command A) interleave three sliding-window layers with rotary and
#   one global layer with **no positional encoding at all** (see notebook 02).

# %% [markdown]
# ## Loading
#
# As with transformers, `from_pretrained` loads **float32** unless told otherwise; `torch_dtype=torch.float16`
# loads half precision and `torch_dtype="auto"` takes the dtype written in `config.json`. For a 35B model each
# extra copy costs 70–140 GB, so the extra loads below run only for small models.

# %%
tokenizer = Tokenizer.from_pretrained(MODEL)
if SMALL:
    model = HookedCommandR.from_pretrained(MODEL)                                 # float32
    model_fp16 = HookedCommandR.from_pretrained(MODEL, torch_dtype=torch.float16)
    model_auto = HookedCommandR.from_pretrained(MODEL, torch_dtype="auto")         # config.json's dtype
    print("default:", model.dtype, "| float16:", model_fp16.dtype, "| auto:", model_auto.dtype)
    del model_fp16, model_auto
else:                                      # a real checkpoint: its own dtype, spread over the GPUs (notebook 05)
    model = HookedCommandR.from_pretrained(MODEL, torch_dtype="auto", device_map="auto")
    print("loaded in", model.dtype)
print(tokenizer)

# %% [markdown]
# ## The chat template
#
# Command-R's prompt format wraps every turn in `<|START_OF_TURN_TOKEN|>` … `<|END_OF_TURN_TOKEN|>` with a
# role token (`<|USER_TOKEN|>`, `<|CHATBOT_TOKEN|>`, `<|SYSTEM_TOKEN|>`); the template also writes the
# `<BOS_TOKEN>`, so the rendered string is tokenized without adding another one.
# `add_generation_prompt=True` ends the prompt with the chatbot's turn header, where the model answers.

# %%
# Format message with the command-r chat template
messages = [{"role": "user", "content": "Hello, how are you?"}]
prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
print(prompt)

# %%
input_ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_tensors="pt")
input_ids = input_ids.to(model.device)
print(input_ids.shape, input_ids[0].tolist())
assert tokenizer.decode(input_ids[0]) == prompt     # the ids spell exactly the prompt string

# %% [markdown]
# ## Generation, as in the model card
#
# `model.generate` follows transformers' semantics (sampling with temperature, stop at
# `<|END_OF_TURN_TOKEN|>`), with a KV cache. The model card samples with `temperature=0.3`.

# %%
gen_tokens = model.generate(
    input_ids,
    max_new_tokens=100,
    do_sample=True,
    temperature=0.3,
)

gen_text = tokenizer.decode(gen_tokens[0])
print(gen_text)

# %% [markdown]
# The reply alone, without the prompt and the special tokens, and the same thing streamed token by
# token with `TextStreamer` (greedy this time):

# %%
from workbench import TextStreamer

print(repr(tokenizer.decode(gen_tokens[0, input_ids.shape[1]:], skip_special_tokens=True)))
_ = model.generate(input_ids, max_new_tokens=30, streamer=TextStreamer(tokenizer))

# %% [markdown]
# ## The 4-bit example
#
# The model card's quantized example passes `BitsAndBytesConfig(load_in_4bit=True)`. Here the same fields
# live in `workbench.QuantizationConfig` (a transformers `BitsAndBytesConfig` is accepted too). The linear
# layers of the blocks become bitsandbytes `Linear4bit`; embeddings and norms stay in full precision, and
# every hook still works. bitsandbytes ≥ 0.45 also runs 4-bit on the CPU.

# %%
import importlib.util

from workbench import QuantizationConfig

bnb_config = QuantizationConfig(load_in_4bit=True)
if importlib.util.find_spec("bitsandbytes") is None:
    print("bitsandbytes is not installed: skipping the 4-bit example "
          "(pip install 'commandr-workbench[quantization]' to run it)")
elif not SMALL:
    print("a second, 4-bit copy of a large model next to the one loaded above may not fit: in a fresh kernel run\n"
          "  model = HookedCommandR.from_pretrained(MODEL, quantization_config=bnb_config, device_map='auto')")
else:
    model_4bit = HookedCommandR.from_pretrained(MODEL, quantization_config=bnb_config)
    print(model_4bit.blocks[0].attn.q_proj)
    with torch.no_grad():
        ref = model(input_ids).float()
        q4 = model_4bit(input_ids.to(model_4bit.device)).float().to(ref.device)
    agree = (q4.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"max |logit difference| vs the full-precision model: {(q4 - ref).abs().max().item():.4f}; "
          f"same top-1 token at {agree:.0%} of positions")
    gen_4bit = model_4bit.generate(input_ids.to(model_4bit.device), max_new_tokens=20)
    print(tokenizer.decode(gen_4bit[0, input_ids.shape[1]:]))
    del model_4bit

# %% [markdown]
# ## Tokenizer basics
#
# The transformers docs' example: `encode` adds `<BOS_TOKEN>` (id 5) and no end token. With the real
# Command-R tokenizer this gives `[5, 28339, 2075, 1801, 1671, 3282]`; the tiny model has its own,
# smaller vocabulary (same special tokens at the same low ids), so its ids differ. `token_pieces` shows what
# each id stands for (space as `·`).

# %%
ids = tokenizer.encode("Hello this is a test")
print(ids)
print([p.text for p in tokenizer.token_pieces(ids)])
print(repr(tokenizer.decode(ids)))

# %% [markdown]
# ## Tool use and RAG prompts
#
# Command-R was trained for single-step tool use and grounded generation (RAG) with citations. The
# tokenizer ships three templates: `default`, `tool_use` and `rag` (the tiny model's are written for this
# project in the same format). `apply_tool_use_template` renders the tools as Python function stubs in a
# system turn; `apply_grounded_generation_template` lists the documents and asks for a grounded answer with
# `<co: doc>` citations. These are the model card's examples.

# %%
# define conversation input:
conversation = [
    {"role": "user", "content": "Whats the biggest penguin in the world?"}
]
# Define tools available for the model to use:
tools = [
    {
        "name": "internet_search",
        "description": "Returns a list of relevant document snippets for a textual query retrieved from the internet",
        "parameter_definitions": {
            "query": {
                "description": "Query to search the internet with",
                "type": "str",
                "required": True,
            }
        },
    },
    {
        "name": "directly_answer",
        "description": "Calls a standard (un-augmented) AI chatbot to generate a response given the conversation history",
        "parameter_definitions": {},
    },
]

# render the tool use prompt as a string:
tool_use_prompt = tokenizer.apply_tool_use_template(conversation, tools=tools, tokenize=False,
                                                    add_generation_prompt=True)
print(tool_use_prompt)

# %%
# define documents to ground on:
documents = [
    {"title": "Tall penguins", "text": "Emperor penguins are the tallest growing up to 122 cm in height."},
    {"title": "Penguin habitats", "text": "Emperor penguins only live in Antarctica."},
]

# render the grounded generation prompt as a string:
grounded_generation_prompt = tokenizer.apply_grounded_generation_template(
    conversation,
    documents=documents,
    citation_mode="accurate",  # or "fast"
    tokenize=False,
    add_generation_prompt=True,
)
print(grounded_generation_prompt)

# %% [markdown]
# Both prompts are ordinary token sequences: tokenize and generate exactly as above. A real Command-R answers
# with an `Action:` JSON list, or with relevant and cited documents, an answer and a `Grounded answer:` with
# `<co: doc>` citations. The tiny model was never trained on tool use; it was fine-tuned on the `rag` format
# with short synthetic documents about people ("Alice lives in Paris."), so it writes the grounded-answer format
# here, but penguins are outside what it knows (`06_rag_lens` uses questions it can answer).

# %%
rag_ids = tokenizer.apply_grounded_generation_template(conversation, documents=documents, tokenize=True,
                                                       add_generation_prompt=True, return_tensors="pt")
tool_ids = tokenizer.apply_tool_use_template(conversation, tools=tools, tokenize=True,
                                             add_generation_prompt=True, return_tensors="pt")
print("tool_use prompt:", tool_ids.shape[1], "tokens | rag prompt:", rag_ids.shape[1], "tokens")
out = model.generate(rag_ids.to(model.device), max_new_tokens=60)
print(repr(tokenizer.decode(out[0, rag_ids.shape[1]:])))

# %% [markdown]
# ## Next
#
# * `01_hooks_and_cache` — every activation has a name: cache it, edit it, patch it, also while generating.
# * `02_attention` — token and attention views; finding induction and previous-token heads; local vs global
#   layers of `cohere2`.
# * `03_activation_patching` — clean vs corrupted prompts, patching sweeps, ablations.
# * `04_logit_lens_and_generation` — logit lens, live generation dashboard, direct logit attribution, steering.
# * `05_big_model_offload` — planning memory for the 35B/104B/111B models; GPUs, CPU and disk offload.
