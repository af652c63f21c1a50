"""``python -m workbench``: the main job — load a model, show its hooks, run a prompt, generate.

Runs on the embedded default model unless ``--model PATH`` (or $WORKBENCH_MODEL_PATH) is given.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from .hook_table import format_hook_table
from .model import HookedCommandR
from .tokenizer import Tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m workbench", description=__doc__)
    p.add_argument("--model", default=os.environ.get("WORKBENCH_MODEL_PATH", "command-r-tiny"))
    p.add_argument("--dtype", default=None, help="float32 (default), float16, bfloat16 or auto")
    p.add_argument("--prompt", default="Hello, how are you?")
    p.add_argument("--max-new-tokens", type=int, default=40)
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    model = HookedCommandR.from_pretrained(args.model, torch_dtype=args.dtype)
    cfg = model.cfg
    print(f"loaded {args.model}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads "
          f"({cfg.n_kv_heads} kv), qk-norm {cfg.use_qk_norm}, logit_scale {cfg.logit_scale}, "
          f"{model.dtype} in {time.perf_counter() - t0:.2f}s")
    print(format_hook_table(model.hook_table(1, 8)[:30]), "\n...")
    try:
        tok = Tokenizer.from_pretrained(args.model)
    except Exception as e:  # noqa: BLE001 - a model folder without a tokenizer still runs
        print(f"(no tokenizer: {e})")
        tok = None
    if tok is not None:
        messages = [{"role": "user", "content": args.prompt}]
        print("prompt:", tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    else:
        ids = torch.tensor([[cfg.bos_token_id or 0] * 4])
    logits, cache = model.run_with_cache(ids)
    print(f"forward: logits {tuple(logits.shape)}, cached {len(cache)} activations")
    try:
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.3,
                             generator=torch.Generator().manual_seed(0))
        if tok is not None:
            print("reply:", tok.decode(out[0, ids.shape[1]:], skip_special_tokens=False))
        else:
            print("generated ids:", out[0, ids.shape[1]:].tolist())
    except ImportError as e:
        print(f"(generation unavailable: {e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
