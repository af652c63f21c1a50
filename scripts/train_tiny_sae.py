"""Train the bundled example SAE: a ReLU SAE on ``command-r-tiny``'s ``blocks.2.hook_resid_post``.

Data: plain text documents from ``scripts/tiny_data.py`` (facts, arithmetic, repeated spans), a
few thousand tokens; a disjoint held-out set (another seed) is stored in the SAE's metadata with
the measured reconstruction numbers, so a reload can be checked against them. Runs in about a
minute on one CPU core.

    python scripts/train_tiny_sae.py [--out workbench/bundled/saes/command-r-tiny-res-l2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tiny_data import TinyData  # noqa: E402

from workbench.model import HookedCommandR  # noqa: E402
from workbench.sae import SAE  # noqa: E402
from workbench.sae_train import collect_activations, evaluate_sae, train_sae  # noqa: E402

HOOK = "blocks.2.hook_resid_post"
OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workbench", "bundled", "saes",
                   "command-r-tiny-res-l2")


def texts(seed: int, n: int) -> list:
    gen = TinyData(seed=seed)
    return [gen.text() for _ in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=OUT)
    ap.add_argument("--docs", type=int, default=320)
    ap.add_argument("--d-sae", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--l1", type=float, default=0.2)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    t0 = time.time()
    model = HookedCommandR.from_pretrained("command-r-tiny", dtype=torch.float32, progress=False)
    train_ids, train_mask = model.tokenize_batch(texts(1, args.docs), True, "right")
    eval_texts = texts(2, 24)
    eval_ids, eval_mask = model.tokenize_batch(eval_texts, True, "right")
    acts = collect_activations(model, train_ids, HOOK, train_mask)
    print(f"{acts.shape[0]} training positions at {HOOK}")
    meta = {"model_name": "command-r-tiny", "hook_layer": 2, "prepend_bos": True, "context_size": int(train_ids.shape[1]),
            "dataset_path": "scripts/tiny_data.py TinyData(seed=1).text()", "training_tokens": int(acts.shape[0]),
            "trained_by": "workbench.sae_train.train_sae via scripts/train_tiny_sae.py",
            "weights_stored_as": "float16 (loaded as float32)"}
    sae = train_sae(acts, args.d_sae, HOOK, l1_coefficient=args.l1, steps=args.steps, metadata=meta)
    # round to what the file stores, then measure: a reload reproduces these numbers
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(p.half().float())
    stats = evaluate_sae(model, sae, eval_ids, eval_mask)
    sae.cfg.metadata.update(eval_texts=eval_texts, eval_dtype="float32", reconstruction=stats)
    sae.save_model(args.out, weights_dtype=torch.float16)
    again = SAE.load_from_disk(args.out)
    assert all(torch.equal(a, b) for a, b in zip(sae.parameters(), again.parameters()))
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()},
          f"{time.time() - t0:.0f}s, {sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))} bytes")


if __name__ == "__main__":
    main()
