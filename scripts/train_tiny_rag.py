"""Fine-tune the bundled ``command-r-tiny`` on grounded answering in its ``rag`` template (CPU, fixed seeds).

Starts from the checkpoint trained by ``train_tiny.py`` (so the induction heads and the chat turns are kept)
and trains on a mix of
  * the original data (``train_tiny.Batches``: chat dialogues, facts, stories, repeated spans and
    ``<BOS_TOKEN> r r`` rows of random ids), and
  * retrieval-augmented conversations from ``tiny_data.RagData``: 3-5 short documents about people, a
    question answered by one or two of them, and the reply in the ``rag`` template's format
    (Relevant Documents / Cited Documents / Answer / Grounded answer with ``<co: i>...</co: i>`` markup).

plus two cheaper drills of the same skill: ``compact`` rows (the same conversation without the template's
long fixed preamble and instructions, ~220 tokens) and ``mini`` rows (256-token rows packed with plain-text
"Document: i / text: ... / Question: ... / Relevant Documents: i / Answer: ..." drills).

Status: within this project's CPU budget (about an hour of wall time on a shared 2-core machine, ~420 steps
in four runs: rag only; + compact rows; + mini rows) the model learned the reply format (loss on reply tokens
0.21 nats) and its induction heads stayed (best induction score 0.99), but not the lookup: held-out greedy
accuracy stayed at 0 %. It never learned to copy the person's name from the question into the answer, even
in the 100-token drills. The bundled checkpoint is therefore still the base one.

The ``rag`` prompt starts with a long fixed preamble (~400 tokens, identical for every question without a
system message): each step runs it once, without gradient, and every conversation of the step continues
from its keys and values (``KVCache.update`` with the prefix broadcast over the batch). The loss on a
conversation covers its reply only (from the first token after ``<|CHATBOT_TOKEN|>`` through
``<|END_OF_TURN_TOKEN|>``).

Reproduce the bundled checkpoint (from the checkpoint that ``train_tiny.py`` wrote)::

    python scripts/train_tiny.py --out /tmp/tiny-base --threads 1
    python scripts/train_tiny_rag.py --init /tmp/tiny-base --out workbench/bundled/command-r-tiny

Smoke run::

    python scripts/train_tiny_rag.py --out /tmp/tiny-rag-smoke --steps 4 --eval-every 2 --eval-n 2
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import shutil
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from tiny_data import RagData  # noqa: E402
from train_tiny import Batches, chat, structure_metrics, repeated_tokens  # noqa: E402

from workbench import HookedCommandR  # noqa: E402
from workbench.kv_cache import KVCache  # noqa: E402
from workbench.tokenizer import Tokenizer  # noqa: E402

USER_TURN = "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>"
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
HELD_OUT_SEED = 424242          # the held-out questions (tests/test_tiny_model.py uses the same stream)


# ----------------------------------------------------------------------------------------- data
def rag_prompt(tok: Tokenizer, example: dict) -> list[int]:
    """Token ids of the rendered ``rag`` prompt (generation prompt included)."""
    return tok.apply_chat_template(example["messages"], documents=example["documents"], chat_template="rag",
                                   add_generation_prompt=True)


def shared_prefix(tok: Tokenizer) -> list[int]:
    """Ids of the ``rag`` prompt before the first user turn: the same for every question without a system
    message (checked against each rendered prompt)."""
    ex = RagData(0).example()
    text = tok.apply_chat_template(ex["messages"], documents=ex["documents"], chat_template="rag",
                                   add_generation_prompt=True, tokenize=False)
    return tok.encode(text[: text.index(USER_TURN)], add_special_tokens=False)


class RagBatches:
    """Per step: ``n`` conversations in three pieces that follow the shared prefix:
    ``a`` [n, La] the user turn and the documents (right-padded, ``a_len`` real lengths), ``b`` [Lb] the fixed
    instructions after ``</results>`` up to (not including) the final ``<|CHATBOT_TOKEN|>``, identical in
    every row, and ``c`` [n, Lc] ``<|CHATBOT_TOKEN|>`` + reply + ``<|END_OF_TURN_TOKEN|>`` (right-padded) with
    ``labels`` [n, Lc] (-100 off the reply)."""

    def __init__(self, tok: Tokenizer, n: int, seed: int) -> None:
        self.tok, self.n = tok, n
        self.data = RagData(seed)
        self.prefix = shared_prefix(tok)
        ex = RagData(seed).example()
        text = tok.apply_chat_template(ex["messages"], documents=ex["documents"], chat_template="rag",
                                       add_generation_prompt=True, tokenize=False)
        self.instructions = tok.encode(text[text.index("</results>"):], add_special_tokens=False)[:-1]

    def next(self) -> dict:
        P, B = len(self.prefix), self.instructions
        a_rows, c_rows, labels = [], [], []
        for _ in range(self.n):
            ex = self.data.example()
            prompt = rag_prompt(self.tok, ex)
            assert prompt[:P] == self.prefix, "rag prompt does not start with the shared prefix"
            assert prompt[-len(B) - 1:-1] == B, "rag prompt does not end with the fixed instructions"
            reply = self.tok.encode(ex["response"], add_special_tokens=False) + [self.tok.eos_token_id]
            a_rows.append(prompt[P:-len(B) - 1])
            c_rows.append(prompt[-1:] + reply)
            labels.append(reply + [-100])                               # label at j = token j + 1
        La, Lc = max(map(len, a_rows)), max(map(len, c_rows))
        a = torch.full((self.n, La), self.tok.pad_token_id)
        c = torch.full((self.n, Lc), self.tok.pad_token_id)
        y = torch.full((self.n, Lc), -100)
        for i, (ra, rc, lab) in enumerate(zip(a_rows, c_rows, labels)):
            a[i, :len(ra)], c[i, :len(rc)], y[i, :len(lab)] = torch.tensor(ra), torch.tensor(rc), torch.tensor(lab)
        return {"a": a, "a_len": torch.tensor([len(r) for r in a_rows]), "b": torch.tensor(B), "c": c,
                "c_len": torch.tensor([len(r) for r in c_rows]), "labels": y}


def compact_prompt(tok: Tokenizer, example: dict) -> list[int]:
    """The ``rag`` prompt without its long fixed parts: ``<BOS_TOKEN>``, the user turn, the documents' system
    turn exactly as the template writes it, and the generation prompt (~150 tokens instead of ~1000)."""
    text = tok.apply_chat_template(example["messages"], documents=example["documents"], chat_template="rag",
                                   add_generation_prompt=True, tokenize=False)
    end = "</results><|END_OF_TURN_TOKEN|>"
    body = text[text.index(USER_TURN):text.index(end) + len(end)]
    return tok.encode("<BOS_TOKEN>" + body + "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", add_special_tokens=False)


class CompactBatches:
    """Per step: ``n`` short rag rows (``compact_prompt`` + reply), right-padded ``[n, T]`` with labels on the reply:
    the same lookup and citation skill at short range, many conversations per step for little compute."""

    def __init__(self, tok: Tokenizer, n: int, seed: int) -> None:
        self.tok, self.n = tok, n
        self.data = RagData(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, labels = [], []
        for _ in range(self.n):
            ex = self.data.example()
            prompt = compact_prompt(self.tok, ex)
            reply = self.tok.encode(ex["response"], add_special_tokens=False) + [self.tok.eos_token_id]
            rows.append(prompt + reply)
            labels.append([-100] * (len(prompt) - 1) + reply + [-100])
        T = max(map(len, rows))
        x = torch.full((self.n, T), self.tok.pad_token_id)
        y = torch.full((self.n, T), -100)
        for i, (r, lab) in enumerate(zip(rows, labels)):
            x[i, :len(r)], y[i, :len(lab)] = torch.tensor(r), torch.tensor(lab)
        return x, y


class MiniBatches:
    """Per step: ``n`` rows of ``row_len`` tokens packed with ``RagData.mini`` drills (``<BOS_TOKEN>`` before each),
    labels on the question, the relevant documents and the answer (not on the random documents)."""

    def __init__(self, tok: Tokenizer, n: int, seed: int, row_len: int = 256) -> None:
        self.tok, self.n, self.row_len = tok, n, row_len
        self.data = RagData(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(self.n):
            x, y = [], []
            while len(x) < self.row_len + 1:
                docs, rest = self.data.mini()
                a = [self.tok.bos_token_id] + self.tok.encode(docs, add_special_tokens=False)
                b = self.tok.encode(rest, add_special_tokens=False)
                x += a + b
                y += [-100] * len(a) + b
            xs.append(x[:self.row_len + 1])
            ys.append(y[1:self.row_len + 1])                          # label at j = token j + 1
        return torch.tensor(xs)[:, :-1], torch.tensor(ys)


def prefix_cache(model: HookedCommandR, prefix: list[int], batch: int) -> KVCache:
    """A cache holding the shared prefix (computed once, without gradient) for ``batch`` continuations."""
    one = KVCache.for_model(model)
    with torch.no_grad():
        model(torch.tensor([prefix]), kv_cache=one)
    cache = KVCache.for_model(model)
    for layer, (k, v) in enumerate(zip(one.keys, one.values)):    # [1 kv_head pos d_head]
        cache.update(layer, k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
    cache.advance(len(prefix))
    return cache


def rag_logits(model: HookedCommandR, prefix: list[int], batch: dict) -> torch.Tensor:
    """Logits [n, Lc, vocab] of piece ``c``. The prefix and the fixed instructions run without gradient (their
    keys and values are inputs); the user turn + documents and the reply run with it, so the reply's loss
    trains how the documents are represented and how the reply reads them."""
    a, c, a_len, c_len = batch["a"], batch["c"], batch["a_len"], batch["c_len"]
    n, La = a.shape
    P, Lb, Lc = len(prefix), len(batch["b"]), c.shape[1]
    cache = prefix_cache(model, prefix, n)
    real_a = torch.arange(La)[None] < a_len[:, None]                   # [n La]
    mask = torch.cat([torch.ones(n, P, dtype=torch.long), real_a.long()], dim=1)
    model(a, attention_mask=mask, kv_cache=cache, logits_to_keep=1)    # documents, with gradient
    keys_a, values_a = cache.keys, cache.values                          # [n kv_head P+La d_head]
    start_b = P + a_len[:, None]                                         # real position after the documents
    mask = torch.cat([mask, torch.ones(n, Lb, dtype=torch.long)], dim=1)
    with torch.no_grad():
        model(batch["b"][None].expand(n, -1), attention_mask=mask, position_ids=start_b + torch.arange(Lb)[None],
              kv_cache=cache, logits_to_keep=1)
    full = KVCache.for_model(model)
    for layer in range(model.cfg.n_layers):
        kb, vb = cache.keys[layer][:, :, -Lb:], cache.values[layer][:, :, -Lb:]
        full.update(layer, torch.cat([keys_a[layer], kb], dim=2), torch.cat([values_a[layer], vb], dim=2))
    full.advance(P + La + Lb)
    real_c = torch.arange(Lc)[None] < c_len[:, None]
    mask = torch.cat([mask, real_c.long()], dim=1)
    return model(c, attention_mask=mask, position_ids=start_b + Lb + torch.arange(Lc)[None], kv_cache=full)


# ----------------------------------------------------------------------------------------- evaluation
CO = re.compile(r"<co: ?([0-9, ]+)>(.*?)</co: ?[0-9, ]+>", re.S)


def grade(response: str, example: dict) -> dict:
    """Does the grounded answer copy every fact and cite exactly the source document(s)?"""
    grounded = response.split("Grounded answer:", 1)[1] if "Grounded answer:" in response else ""
    cited = set()
    for nums, _ in CO.findall(grounded):
        cited |= {int(x) for x in re.findall(r"\d+", nums)}
    facts = all(v in grounded for v in example["facts"])
    cites = cited == set(example["sources"])
    return {"facts": facts, "cites": cites, "ok": facts and cites}


@torch.no_grad()
def rag_accuracy(model: HookedCommandR, tok: Tokenizer, n: int, seed: int = HELD_OUT_SEED,
                 max_new: int = 90, batch: int = 8, compact: bool = False) -> dict:
    """Greedy replies to ``n`` held-out questions; fraction answered from the right document(s) and citing them."""
    data = RagData(seed)
    examples = [data.example() for _ in range(n)]
    replies = []
    for s in range(0, n, batch):
        chunk = examples[s:s + batch]
        prompts = [(compact_prompt if compact else rag_prompt)(tok, ex) for ex in chunk]
        T = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_token_id] * (T - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                             eos_token_id=tok.eos_token_id)
        for row in out[:, T:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            replies.append(tok.decode([t for t in row if t != tok.pad_token_id]))
    grades = [grade(r, ex) for r, ex in zip(replies, examples)]
    by_kind: dict = {}
    for g, ex in zip(grades, examples):
        kind = ("one document" if len(ex["sources"]) == 1 else
                "two facts, two documents" if ex["response"].count("<co:") == 2 else "one fact in two documents")
        by_kind.setdefault(kind, []).append(g["ok"])
    return {"accuracy": sum(g["ok"] for g in grades) / n, "facts": sum(g["facts"] for g in grades) / n,
            "cites": sum(g["cites"] for g in grades) / n, "n": n,
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "examples": [{"question": ex["messages"][0]["content"], "sources": ex["sources"], "reply": r}
                         for ex, r in list(zip(examples, replies))[:4]]}


# ----------------------------------------------------------------------------------------- training
def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def save(model: HookedCommandR, init: str, out: str) -> None:
    """Float16 weights + config + generation_config + the (unchanged) tokenizer files."""
    os.makedirs(out, exist_ok=True)
    half = copy.deepcopy(model).half().eval()
    half.save_pretrained(out)
    for name in TOKENIZER_FILES + ["generation_config.json"]:
        src = os.path.join(init, name)
        if os.path.abspath(src) != os.path.abspath(os.path.join(out, name)):
            shutil.copyfile(src, os.path.join(out, name))


def train(args) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    tok = Tokenizer.from_pretrained(args.init)
    model = HookedCommandR.from_pretrained(args.init, dtype=torch.float32)
    model.train()
    model.attn_impl = "fused"
    cfg = model.cfg
    groups = {"decay": [], "no_decay": [], "qk_norm": []}
    for n, p in model.named_parameters():
        if n.endswith(("q_norm.weight", "k_norm.weight")):
            groups["qk_norm"].append(p)
        elif p.dim() == 2 and not n.startswith("embed"):
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    opt = torch.optim.AdamW([{"params": groups["decay"], "weight_decay": args.weight_decay, "lr_mult": 1.0},
                             {"params": groups["no_decay"], "weight_decay": 0.0, "lr_mult": 1.0},
                             {"params": groups["qk_norm"], "weight_decay": 0.0, "lr_mult": args.qk_norm_lr_mult}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    old = Batches(tok, cfg.vocab_size, 128, args.old_batch, 0.75, args.seed + 10, (8, 30), 64)
    rag = RagBatches(tok, args.rag_batch, args.seed + 20)
    compact = CompactBatches(tok, args.compact_batch, args.seed + 30)
    run_c = None
    mini, run_m = MiniBatches(tok, args.mini_batch, args.seed + 40), None
    eval_tokens = repeated_tokens(cfg.vocab_size, tok.bos_token_id, 20, 8, seed=99)
    history, t0, run_old, run_rag = [], time.time(), None, None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args) * g["lr_mult"]
        opt.zero_grad(set_to_none=True)
        parts = old.next()
        n_tokens = sum(b[:, 1:].numel() for b in parts)
        old_sum = 0.0
        for b in parts:
            logits = model(b[:, :-1])
            part = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), b[:, 1:].reshape(-1), reduction="sum")
            (part / n_tokens).backward()
            old_sum += part.item()
        batch = rag.next()
        logits = rag_logits(model, rag.prefix, batch)                     # [batch pos vocab]
        rag_loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), batch["labels"].reshape(-1),
                                   ignore_index=-100)
        (args.rag_weight * rag_loss).backward()
        if args.mini_batch:
            x, y = mini.next()
            m_loss = F.cross_entropy(model(x).float().reshape(-1, cfg.vocab_size), y.reshape(-1), ignore_index=-100)
            m_loss.backward()
            run_m = m_loss.item() if run_m is None else 0.95 * run_m + 0.05 * m_loss.item()
        if args.compact_batch:
            x, y = compact.next()
            c_loss = F.cross_entropy(model(x).float().reshape(-1, cfg.vocab_size), y.reshape(-1), ignore_index=-100)
            (args.compact_weight * c_loss).backward()
            run_c = c_loss.item() if run_c is None else 0.95 * run_c + 0.05 * c_loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        lo, lr_ = old_sum / n_tokens, rag_loss.item()
        run_old = lo if run_old is None else 0.95 * run_old + 0.05 * lo
        run_rag = lr_ if run_rag is None else 0.95 * run_rag + 0.05 * lr_
        if (step + 1) % args.log_every == 0:
            print(f"step {step + 1} old {run_old:.4f} rag {run_rag:.4f} compact {run_c or 0:.4f} mini {run_m or 0:.4f} "
                  f"{time.time() - t0:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            model.attn_impl = "explicit"
            m = structure_metrics(model, eval_tokens, 20)
            acc = rag_accuracy(model, tok, args.eval_n, seed=HELD_OUT_SEED + 1)   # not the test's questions
            short = rag_accuracy(model, tok, args.eval_n, seed=HELD_OUT_SEED + 1, compact=True)
            row = {"step": step + 1, "old_loss": round(run_old, 4), "rag_loss": round(run_rag, 4),
                   "time_s": round(time.time() - t0, 1), "rag_accuracy": acc["accuracy"],
                   "rag_facts": acc["facts"], "rag_cites": acc["cites"], "compact_accuracy": short["accuracy"],
                   "induction_max": round(float(m["induction"].max()), 3),
                   "previous_max": round(float(m["previous"].max()), 3),
                   "loss_first": round(m["loss_first"], 3), "loss_second": round(m["loss_second"], 3)}
            history.append(row)
            print(json.dumps(row), "|", repr(chat(model, tok, "Hello, how are you?", 16)), "|",
                  repr(acc["examples"][0]["reply"]), flush=True)
            save(model, args.init, os.path.join(args.ckpt, f"step{step + 1:04d}"))
            model.attn_impl = "fused"
            model.train()
        if args.max_minutes and time.time() - t0 > 60 * args.max_minutes:
            print(f"stopping at step {step + 1}: time budget of {args.max_minutes} minutes spent", flush=True)
            break
    model.eval()
    save(model, args.init, args.out)
    report = {"history": history, "train_time_s": round(time.time() - t0, 1), "steps_done": step + 1,
              "args": vars(args)}
    with open(os.path.join(args.ckpt, "finetune_report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def base_report(card: str) -> dict:
    """What ``train_tiny.write_model_card`` needs about the base run, read back from its model card."""
    history = []
    for m in re.finditer(r"^\| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", card, re.M):
        step, loss, first, second, ind, prev = m.groups()
        history.append({"step": int(step), "loss": float(loss), "loss_first": float(first), "loss_second": float(second),
                        "induction_max": float(ind), "previous_max": float(prev)})
    minutes = float(re.search(r"Training took ([\d.]+) minutes", card).group(1))
    args = {"seed": 0, "threads": 1, "steps": 2000, "batch": 16, "seq_len": 128, "lr": 3e-3, "min_lr_frac": 0.1,
            "warmup": 50, "weight_decay": 0.1, "qk_norm_lr_mult": 10.0, "clip": 1.0, "embed_std": 0.02,
            "frac_random": 0.75, "rand_min": 8, "rand_max": 30, "rand_row_len": 64}
    return {"history": history, "train_time_s": minutes * 60, "final_train_loss": history[-1]["loss"], "args": args}


def write_card(out: str, base_card: str, reports: list, command: str) -> dict:
    """Measure the saved checkpoint ``out`` and write its MODEL_CARD.md (base run + fine-tuning + rag numbers).
    ``reports``: the fine-tuning reports in order (a run resumed from another's checkpoint continues its steps)."""
    from train_tiny import evaluate, write_model_card

    report = base_report(base_card)
    model = HookedCommandR.from_pretrained(out, dtype=torch.float32)
    report["n_params"] = sum(p.numel() for p in model.parameters())
    report.update(evaluate(out, 0))
    tok = Tokenizer.from_pretrained(out)
    acc = rag_accuracy(model, tok, 100, seed=HELD_OUT_SEED)
    history, offset, seconds = [], 0, 0.0
    for r in reports:
        upto = r.get("resume_step")                       # the earlier run's rows after it are not in the model
        if upto is not None:
            history = [h for h in history if h["step"] <= upto]
            offset, seconds = upto, next(h["time_s"] for h in history if h["step"] == upto)
        history += [{**h, "step": h["step"] + offset, "time_s": h["time_s"] + seconds} for h in r["history"]]
        offset, seconds = history[-1]["step"], history[-1]["time_s"]
    report["rag"] = {**acc, "history": history, "args": reports[-1]["args"], "steps": history[-1]["step"],
                     "minutes": history[-1]["time_s"] / 60, "command": command}
    write_model_card(out, report)
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description="Fine-tune command-r-tiny on grounded answering (rag template).")
    ap.add_argument("--init", default=os.path.join(os.path.dirname(HERE), "workbench", "bundled", "command-r-tiny"))
    ap.add_argument("--out", default="/tmp/command-r-tiny-rag")
    ap.add_argument("--ckpt", default="/tmp/command-r-tiny-rag-ckpt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop early after this much wall time (0: never)")
    ap.add_argument("--old-batch", type=int, default=8, help="rows of the original mixture per step (a quarter natural)")
    ap.add_argument("--rag-batch", type=int, default=4, help="rag conversations per step")
    ap.add_argument("--rag-weight", type=float, default=1.0)
    ap.add_argument("--compact-batch", type=int, default=12, help="short rag rows (no preamble) per step")
    ap.add_argument("--compact-weight", type=float, default=1.0)
    ap.add_argument("--mini-batch", type=int, default=0, help="256-token rows of packed plain-text drills per step")
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--qk-norm-lr-mult", type=float, default=3.0)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=10)
    args = ap.parse_args()
    os.makedirs(args.ckpt, exist_ok=True)
    train(args)


if __name__ == "__main__":
    main()
