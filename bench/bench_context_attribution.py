"""Context attribution on rag prompts: cost in forward-equivalents and agreement with exact leave-one-out.

For held-out synthetic grounded conversations (``scripts/tiny_data.RagData``, padded with distractor
documents to ``--docs`` documents) and their reference replies, on the bundled ``command-r-tiny``:

* exact leave-one-document-out with ``context_attribution`` (shared prefix through the KV cache, batched);
* the same leave-one-out computed naively (each ablated prompt re-tokenized and run alone, no cache);
* ``context_attribution(n_ablations=k)``: random subsets + Lasso surrogate;
* ``attention`` and ``gradient``;
* ContextCite (``pip install context-cite``, if importable) on the same prompts and replies through
  transformers' ``CohereForCausalLM``: its sources are the documents, its ablation removes their text
  from the rendered prompt (numbers kept, like ours), ``num_ablations=k``.

Reported per method: wall seconds, forward-equivalents (tokens run / tokens of one full prompt + reply),
Spearman rank correlation with exact leave-one-out and top-1 agreement with it, and how often the source
document ranks first. Timings are relative (same machine, same run, one thread).

    python bench/bench_context_attribution.py --examples 5 --docs 10 --ablations 16 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

from _limits import machine_line  # noqa: E402
from tiny_data import RagData  # noqa: E402

from workbench import HookedCommandR  # noqa: E402
from workbench.analysis import context_attribution  # noqa: E402
from workbench.analysis.rag_spans import rag_prompt  # noqa: E402
from workbench.bundled import resolve_model_path  # noqa: E402
from workbench.tokenizer import Tokenizer  # noqa: E402


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-12))


def examples(n: int, n_docs: int, seed: int) -> list:
    """Single-source conversations padded with distractor documents (about other people) to n_docs."""
    data, out = RagData(seed), []
    while len(out) < n:
        ex = data.example()
        if len(ex["sources"]) != 1:
            continue
        person = ex["messages"][0]["content"]
        extra = []
        while len(ex["documents"]) + len(extra) < n_docs:
            other = data.example()["documents"]
            extra += [d for d in other if d["text"].split()[0] not in person]
        ex["documents"] = ex["documents"] + extra[: n_docs - len(ex["documents"])]
        out.append(ex)
    return out


SHORT = ("{{ bos_token }}{% for d in documents %}Document: {{ loop.index0 }}\n{% for k, v in d.items() %}{{ k }}: {{ v }}\n"
         "{% endfor %}{% endfor %}Question: {{ messages[-1]['content'] }}\nAnswer:")


def copy_examples(n: int, n_docs: int, seed: int) -> list:
    """Documents of six random words; the reply repeats one document's words (the tiny model copies them by
    induction, so its reply really depends on that document). Used with the short template ``SHORT``."""
    import random

    from tiny_data import NAMES, WORDS

    r, out = random.Random(seed), []
    for _ in range(n):
        names = [r.choice(NAMES) + str(i) for i in range(n_docs)]
        docs = [{"title": f"{name}'s words", "text": " ".join(r.sample(WORDS, 6)) + "."} for name in names]
        k = r.randrange(n_docs)
        out.append({"messages": [{"role": "user", "content": f"What are {names[k]}'s words?"}], "documents": docs,
                    "response": " " + docs[k]["text"], "sources": [k]})
    return out


def naive_loo(model, tok, ex, template: dict) -> tuple[torch.Tensor, float]:
    """Leave-one-out without the shared prefix or batching: every ablated prompt re-run in full."""
    p = rag_prompt(tok, ex["messages"], ex["documents"], **template)
    reply = tok.encode(ex["response"], add_special_tokens=False)

    def logprob(ids):
        with torch.no_grad():
            lp = model(torch.tensor([ids + reply])).float().log_softmax(-1)[0]
        return sum(float(lp[len(ids) - 1 + j, t]) for j, t in enumerate(reply))

    t0 = time.perf_counter()
    full = logprob(p.ids)
    scores = torch.tensor([full - logprob(p.ids[:r.start] + p.ids[r.end:]) for r in p.ranges])
    return scores, time.perf_counter() - t0


class ContextCiteRun:
    """ContextCite on our rendered rag prompt: sources = documents, ablation = their text removed."""

    def __init__(self, folder: str):
        import transformers
        from context_cite import ContextCiter
        from context_cite.context_partitioner import BaseContextPartitioner

        self.hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
        self.hf_tok.padding_side = "left"
        self.ContextCiter, self.Base = ContextCiter, BaseContextPartitioner

    def scores(self, tok, ex, k: int, template: dict) -> tuple[torch.Tensor, float]:
        p = rag_prompt(tok, ex["messages"], ex["documents"], **template)
        blocks = [(r.char_start, r.char_end) for r in p.ranges]
        text = p.text
        Base = self.Base

        class Documents(Base):
            def split_context(self):
                pass

            @property
            def num_sources(self):
                return len(blocks)

            def get_source(self, i):
                return text[blocks[i][0]:blocks[i][1]]

            def get_context(self, mask=None):
                keep = [True] * len(blocks) if mask is None else list(mask)
                out, at = [], 0
                for (s, e), k_ in zip(blocks, keep):
                    out.append(text[at:s] + (text[s:e] if k_ else ""))
                    at = e
                return "".join(out) + text[at:]

        class Citer(self.ContextCiter):
            def _get_prompt_ids(self, mask=None, return_prompt=False):
                prompt = self.partitioner.get_context(mask)
                ids = self.tokenizer.encode(prompt, add_special_tokens=False)
                return (ids, prompt) if return_prompt else ids

        cc = Citer(self.hf_model, self.hf_tok, text, "", partitioner=Documents(text), num_ablations=k, batch_size=8)
        cc._cache["output"] = text + ex["response"]          # the same reply as ours, not a new generation
        t0 = time.perf_counter()
        w = cc.get_attributions(verbose=False)
        return torch.tensor(w, dtype=torch.float32), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=5)
    ap.add_argument("--docs", type=int, default=10)
    ap.add_argument("--ablations", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--seed", type=int, default=777)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="")
    ap.add_argument("--task", choices=["rag", "copy"], default="rag",
                    help="rag: synthetic grounded questions in the rag template; copy: replies that copy one "
                         "document's words, in a short template without the rag preamble")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder = resolve_model_path("command-r-tiny")
    model = HookedCommandR.from_pretrained(folder, dtype=torch.float32)
    tok = Tokenizer.from_pretrained(folder)
    try:
        cc = ContextCiteRun(folder)
    except ImportError as e:                                   # context-cite (or transformers) not installed
        print(f"ContextCite skipped: {e}")
        cc = None
    rows: dict = {}

    def add(name, scores, exact, source, seconds, fwd):
        r = rows.setdefault(name, {"seconds": 0.0, "fwd": 0.0, "rho": 0.0, "top1": 0, "source_first": 0, "n": 0})
        r["seconds"] += seconds
        r["fwd"] += fwd
        r["rho"] += spearman(scores, exact)
        r["top1"] += int(scores.argmax()) == int(exact.argmax())
        r["source_first"] += int(scores.argmax()) == source
        r["n"] += 1

    template = {"chat_template": SHORT} if args.task == "copy" else {}
    cases = (copy_examples if args.task == "copy" else examples)(args.examples, args.docs, args.seed)
    for ex in cases:
        kw = dict(response=ex["response"], spans="all", **template)
        src = ex["sources"][0]
        n_tok = len(rag_prompt(tok, ex["messages"], ex["documents"], **template).ids) + len(tok.encode(ex["response"], add_special_tokens=False))
        t0 = time.perf_counter()
        exact = context_attribution(model, tok, ex["messages"], ex["documents"], **kw)
        t_exact = time.perf_counter() - t0
        e = exact.scores[0]
        add("leave-one-out (ours: shared prefix, batched)", e, e, src, t_exact, exact.details["forward_equivalents"])
        naive, t_naive = naive_loo(model, tok, ex, template)
        add("leave-one-out (naive: each prompt alone)", naive, e, src, t_naive, len(ex["documents"]) + 1)
        for k in args.ablations:
            t0 = time.perf_counter()
            res = context_attribution(model, tok, ex["messages"], ex["documents"], n_ablations=k, **kw)
            add(f"ours, {k} random subsets + Lasso", res.scores[0], e, src, time.perf_counter() - t0,
                res.details["forward_equivalents"])
            if cc is not None:
                w, t = cc.scores(tok, ex, k, template)
                add(f"ContextCite, num_ablations={k}", w, e, src, t, float(k))
        for m in ("attention", "gradient"):
            t0 = time.perf_counter()
            res = context_attribution(model, tok, ex["messages"], ex["documents"], method=m, **kw)
            add(f"{m}", res.scores[0], e, src, time.perf_counter() - t0, res.details["forward_equivalents"])
        print(f"done: {len(ex['documents'])} documents, {n_tok} tokens", flush=True)

    print(f"\n{machine_line()}\ntask {args.task}: {args.examples} conversations x {args.docs} documents, whole reply as one span, "
          f"threads {args.threads}\n")
    print(f"| method | seconds / conversation | forward-equivalents | Spearman vs exact LOO | top-1 = LOO's | source first |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        n = r["n"]
        print(f"| {name} | {r['seconds'] / n:.2f} | {r['fwd'] / n:.1f} | {r['rho'] / n:.2f} | {r['top1']}/{n} | {r['source_first']}/{n} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
