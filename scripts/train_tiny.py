"""Train ``command-r-tiny``, the bundled default model, on the CPU (reproducible, fixed seeds).

Builds the tokenizer (``build_tiny_tokenizer.py``), trains our own ``HookedCommandR`` with autograd
(AdamW, linear warm-up then cosine decay, fp32) on generated data (``tiny_data.py``), saves the
weights in float16 with Hugging Face tensor names, writes config.json / generation_config.json,
re-loads the saved float16 checkpoint, measures its structure and writes MODEL_CARD.md with the
measured numbers.

Each batch mixes
  * packed natural documents: chat dialogues rendered with the model's own ``default`` chat template,
    facts/arithmetic paragraphs, short stories, word/digit spans that occur twice;
  * rows of ``<BOS_TOKEN> r r`` segments, ``r`` uniformly random token ids of random length: the
    cheapest way to make a previous-token head and an induction head form.

Reproduce the bundled checkpoint (it was trained with ``--threads 1``: 16.5 minutes on a shared 2-core
machine; the exact command is in its MODEL_CARD.md)::

    python scripts/train_tiny.py --out workbench/bundled/command-r-tiny --threads 1

Smoke run (a minute; writes a throw-away checkpoint)::

    python scripts/train_tiny.py --out /tmp/tiny-smoke --steps 20 --eval-every 10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time

# Shared machines: let idle OpenMP threads sleep instead of spinning (no effect on the numbers).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from build_tiny_tokenizer import build as build_tokenizer  # noqa: E402
from tiny_data import TinyData  # noqa: E402

from workbench import CommandRConfig, HookedCommandR  # noqa: E402
from workbench.tokenizer import Tokenizer  # noqa: E402


# ----------------------------------------------------------------------------------------- data
class Batches:
    """Deterministic batches [batch, seq_len + 1] (inputs are [:, :-1], targets [:, 1:])."""

    def __init__(self, tok: Tokenizer, vocab_size: int, seq_len: int, batch: int, frac_random: float,
                 seed: int, rand_len: tuple[int, int], rand_row_len: int) -> None:
        self.tok, self.vocab_size, self.seq_len, self.batch = tok, vocab_size, seq_len, batch
        self.n_random = round(batch * frac_random)
        self.rand_len, self.rand_row_len = rand_len, rand_row_len
        self.data = TinyData(seed)
        self.rng = random.Random(seed + 1)
        self.gen = torch.Generator().manual_seed(seed + 2)
        self.bos = tok.bos_token_id
        self.pending: list[int] = []

    def _document(self) -> list[int]:
        r = self.data.rng.random()
        if r < 0.45:
            text = self.tok.apply_chat_template(self.data.dialogue(), tokenize=False)
            return self.tok.encode(text, add_special_tokens=False)
        if r < 0.75:
            return self.tok.encode(self.data.text())
        if r < 0.85:
            return self.tok.encode(self.data.story())
        return self.tok.encode(self.data.repeated_span())

    def _natural_row(self) -> list[int]:
        # Rows start at a document boundary (so position 0 is always <BOS_TOKEN>, as at inference);
        # the document cut at the end of a row is dropped.
        row: list[int] = []
        while len(row) < self.seq_len + 1:
            row += self._document()
        return row[: self.seq_len + 1]

    def _random_row(self) -> torch.Tensor:
        parts, n = [], 0
        while n < self.rand_row_len + 1:
            length = int(torch.randint(self.rand_len[0], self.rand_len[1] + 1, (1,), generator=self.gen))
            r = torch.randint(0, self.vocab_size, (length,), generator=self.gen)
            seg = torch.cat([torch.tensor([self.bos]), r, r])
            parts.append(seg)
            n += len(seg)
        return torch.cat(parts)[: self.rand_row_len + 1]

    def next(self) -> list[torch.Tensor]:
        """[natural rows [n, seq_len + 1], random rows [m, rand_row_len + 1]] (m = the random share of the
        batch's tokens in rows of rand_row_len: shorter rows mean fewer distracting keys per query)."""
        natural = [torch.tensor(self._natural_row()) for _ in range(self.batch - self.n_random)]
        n_rows = max(1, round(self.n_random * self.seq_len / self.rand_row_len)) if self.n_random else 0
        out = [torch.stack(natural)] if natural else []
        if n_rows:
            out.append(torch.stack([self._random_row() for _ in range(n_rows)]))
        return out


# ----------------------------------------------------------------------------------------- metrics
def repeated_tokens(vocab_size: int, bos: int, seq_len: int, n: int, seed: int, low: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(low, vocab_size, (n, seq_len), generator=gen)
    return torch.cat([torch.full((n, 1), bos), r, r], dim=1)           # [batch 1+2*seq_len]


@torch.no_grad()
def structure_metrics(model: HookedCommandR, tokens: torch.Tensor, seq_len: int) -> dict:
    """Induction / previous-token head scores and the loss on each repeat of ``tokens`` = [BOS] r r."""
    patterns = {}

    def keep(pattern, hook):
        patterns[hook.layer] = pattern.float()

    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    logits = model.run_with_hooks(tokens, fwd_hooks=[(n, keep) for n in names])
    L, H = model.cfg.n_layers, model.cfg.n_heads
    induction, previous = torch.zeros(L, H), torch.zeros(L, H)
    q = torch.arange(1 + seq_len, 1 + 2 * seq_len)                     # second repeat
    qp = torch.arange(1, tokens.shape[1])
    for layer, p in patterns.items():                                   # [batch head q_pos k_pos]
        induction[layer] = p[:, :, q, q - seq_len + 1].mean(dim=(0, 2))
        previous[layer] = p[:, :, qp, qp - 1].mean(dim=(0, 2))
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:], reduction="none")
    first = losses[:, 1:seq_len].mean().item()                           # predicting r[1:] within repeat 1
    second = losses[:, seq_len:2 * seq_len].mean().item()                # predicting repeat 2
    return {"induction": induction, "previous": previous, "loss_first": first, "loss_second": second}


@torch.no_grad()
def greedy(model: HookedCommandR, ids: list[int], max_new: int, stop: int) -> list[int]:
    ids = list(ids)
    for _ in range(max_new):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        ids.append(nxt)
        if nxt == stop:
            break
    return ids


def chat(model, tok, question: str, max_new: int = 24) -> str:
    prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    out = greedy(model, prompt, max_new, tok.eos_token_id)
    return tok.decode(out[len(prompt):])


def top_heads(scores: torch.Tensor, k: int = 3) -> list[tuple[str, float]]:
    flat = scores.flatten()
    idx = flat.argsort(descending=True)[:k]
    H = scores.shape[1]
    return [(f"L{int(i) // H}H{int(i) % H}", round(float(flat[i]), 3)) for i in idx]


# ----------------------------------------------------------------------------------------- training
def make_config(tok: Tokenizer, args) -> CommandRConfig:
    n_ids = len(tok)
    vocab_size = -(-n_ids // 64) * 64          # rows padded like Command-R's (255029 ids, 256000 rows)
    return CommandRConfig(
        vocab_size=vocab_size, d_model=args.d_model, n_layers=args.n_layers, n_heads=args.n_heads,
        n_kv_heads=args.n_kv_heads, d_mlp=args.d_mlp, model_type="cohere", rope_theta=10000.0,
        layer_norm_eps=1e-5, logit_scale=0.0625, use_qk_norm=True, tie_word_embeddings=True,
        max_position_embeddings=args.max_positions, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, torch_dtype="float16",
    )


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def setup_torch(args) -> None:
    """Fixed seed, ``args.threads`` CPU threads, denormals flushed to zero."""
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    # Sharp attention makes denormal floats in the backward pass, which run ~10x slower on x86 CPUs
    # (a run stalled this way at step 450); flushing them to zero is deterministic and costs nothing.
    torch.set_flush_denormal(True)


def make_optimizer(model: HookedCommandR, args) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only and ``args.qk_norm_lr_mult`` x the learning rate on QK-norm weights.

    QK-norm bounds every attention score by |w_q||w_k| sqrt(d_head): with the unit initial norm weights no
    head can attend sharply (a previous-token head tops out near 0.25), and at the base learning rate
    the weights grow by ~lr per step. A larger learning rate on them lets sharp heads form in time.
    """
    groups = {"decay": [], "no_decay": [], "qk_norm": []}
    for n, p in model.named_parameters():
        if n.endswith(("q_norm.weight", "k_norm.weight")):
            groups["qk_norm"].append(p)
        elif p.dim() == 2 and not n.startswith("embed"):
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    return torch.optim.AdamW([{"params": groups["decay"], "weight_decay": args.weight_decay, "lr_mult": 1.0},
                              {"params": groups["no_decay"], "weight_decay": 0.0, "lr_mult": 1.0},
                              {"params": groups["qk_norm"], "weight_decay": 0.0, "lr_mult": args.qk_norm_lr_mult}],
                             lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def start_step(opt: torch.optim.Optimizer, step: int, args) -> None:
    """Set this step's learning rate on every parameter group and clear the gradients."""
    for g in opt.param_groups:
        g["lr"] = lr_at(step, args) * g["lr_mult"]
    opt.zero_grad(set_to_none=True)


def mixture_backward(model: HookedCommandR, parts: list[torch.Tensor]) -> float:
    """Backward the mean next-token loss over all the tokens of ``Batches.next()``'s parts; returns that mean."""
    vocab = model.cfg.vocab_size
    n_tokens = sum(b[:, 1:].numel() for b in parts)
    loss_sum = 0.0
    for b in parts:                                  # mean over all the step's tokens
        logits = model(b[:, :-1])                    # [batch pos vocab]
        part = F.cross_entropy(logits.float().reshape(-1, vocab), b[:, 1:].reshape(-1), reduction="sum")
        (part / n_tokens).backward()
        loss_sum += part.item()
    return loss_sum / n_tokens


def structure_row(m: dict) -> dict:
    """The rounded head scores and repeat losses of ``structure_metrics`` for a training-history row."""
    return {"induction_max": round(float(m["induction"].max()), 3),
            "previous_max": round(float(m["previous"].max()), 3),
            "loss_first": round(m["loss_first"], 3), "loss_second": round(m["loss_second"], 3)}


def add_optim_args(ap: argparse.ArgumentParser, lr: float, warmup: int, qk_norm_lr_mult: float) -> None:
    """The optimiser and schedule options both training scripts take (their defaults differ)."""
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=warmup)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--qk-norm-lr-mult", type=float, default=qk_norm_lr_mult,
                    help="learning-rate multiplier for q/k_norm weights")
    ap.add_argument("--clip", type=float, default=1.0)


def train(args) -> dict:
    setup_torch(args)
    os.makedirs(args.out, exist_ok=True)
    build_tokenizer(args.out, vocab_size=args.bpe_vocab, seed=args.seed + 1000, model_max_length=args.max_positions)
    tok = Tokenizer.from_pretrained(args.out)
    cfg = make_config(tok, args)
    model = HookedCommandR.from_config(cfg, dtype=torch.float32, seed=args.seed)
    with torch.no_grad():
        if args.embed_std != 0.02:  # from_config's init is normal(0, 0.02)
            model.embed.weight.normal_(0.0, args.embed_std, generator=torch.Generator().manual_seed(args.seed + 3))
        # GPT-2 style: residual-writing projections scaled down by depth
        for block in model.blocks:
            block.attn.o_proj.weight.mul_(1 / math.sqrt(2 * cfg.n_layers))
            block.mlp.down_proj.weight.mul_(1 / math.sqrt(2 * cfg.n_layers))
    model.train()
    model.attn_impl = "fused"
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config: {cfg.to_dict()}\nparameters: {n_params:,}; tokenizer ids: {len(tok)}", flush=True)

    opt = make_optimizer(model, args)
    batches = Batches(tok, cfg.vocab_size, args.seq_len, args.batch, args.frac_random, args.seed,
                      (args.rand_min, args.rand_max), args.rand_row_len)
    eval_tokens = repeated_tokens(cfg.vocab_size, tok.bos_token_id, 20, 8, seed=args.seed + 99)
    history = []
    t0, running = time.time(), None
    for step in range(args.steps):
        start_step(opt, step, args)
        loss = torch.tensor(mixture_backward(model, batches.next()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        running = loss.item() if running is None else 0.95 * running + 0.05 * loss.item()
        if args.log_every and (step + 1) % args.log_every == 0:
            print(f"step {step + 1} loss {running:.4f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            m = structure_metrics(model, eval_tokens, 20)
            model.attn_impl = "fused"
            row = {"step": step + 1, "loss": round(running, 4), "time_s": round(time.time() - t0, 1),
                   **structure_row(m)}
            history.append(row)
            print(json.dumps(row), "|", repr(chat(model, tok, "Hello, how are you?", 16)), flush=True)
            model.train()

    model.eval()
    model.half()
    model.save_pretrained(args.out)
    with open(os.path.join(args.out, "generation_config.json"), "w") as f:
        json.dump({"_from_model_config": True, "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
                   "pad_token_id": cfg.pad_token_id}, f, indent=2)
        f.write("\n")
    report = {"history": history, "n_params": n_params, "train_time_s": round(time.time() - t0, 1),
              "final_train_loss": history[-1]["loss"] if history else None, "args": vars(args)}
    return finish(args, report)


def finish(args, report: dict) -> dict:
    """Evaluate the saved checkpoint, write the report JSON and MODEL_CARD.md."""
    report.update(evaluate(args.out, args.seed))
    with open(args.report, "w") as f:
        json.dump(report, f, indent=2)
    write_model_card(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=2), flush=True)
    return report


# ----------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(folder: str, seed: int) -> dict:
    """Structure of the SAVED float16 checkpoint (loaded back in float32 for analysis)."""
    tok = Tokenizer.from_pretrained(folder)
    model = HookedCommandR.from_pretrained(folder, dtype=torch.float32)
    cfg = model.cfg
    out = {}
    for name, low in (("all_ids", 0), ("ordinary_ids", 8)):
        tokens = repeated_tokens(cfg.vocab_size, tok.bos_token_id, 20, 16, seed=seed + 7, low=low)
        m = structure_metrics(model, tokens, 20)
        out[name] = {"induction_top": top_heads(m["induction"]), "previous_top": top_heads(m["previous"]),
                     "loss_first": round(m["loss_first"], 3), "loss_second": round(m["loss_second"], 3),
                     "induction": [[round(float(x), 3) for x in row] for row in m["induction"]],
                     "previous": [[round(float(x), 3) for x in row] for row in m["previous"]]}
    questions = ["Hello, how are you?", "What is the capital of France?", "What colour is the sky?",
                 "What is 3 + 4?", "What does a cow say?", "What is the opposite of hot?",
                 "Repeat after me: purple dragon castle", "Thank you!"]
    out["chat"] = {q: chat(model, tok, q) for q in questions}
    out["completions"] = {}
    for prompt in ["The capital of France is", "The capital of Japan is", "3 + 4 =", "The sky is",
                   "Monday Tuesday Wednesday"]:
        ids = tok.encode(prompt)
        out["completions"][prompt] = tok.decode(greedy(model, ids, 3, -1)[len(ids):])
    return out


# ----------------------------------------------------------------------------------------- model card
def _cell(text: str) -> str:
    """Markdown table cell: the turn tokens contain '|', which would split the cell."""
    return text.replace("|", "\\|").replace("\n", "↵")


def _heads(top: list) -> str:
    return ", ".join(f"{name} ({score:.2f})" for name, score in top)


def rag_section(rag: dict) -> str:
    """The model card's section on grounded answering (the fine-tuning of ``train_tiny_rag.py``)."""
    curve = "\n".join(f"| {h['step']} | {h['old_loss']:.3f} | {h['rag_loss']:.3f} | {h['rag_accuracy']:.2f} | "
                      f"{h['induction_max']:.2f} | {h['loss_second']:.2f} |" for h in rag["history"])
    stages = "\n".join(f"| {i + 1} | {st['steps']} | {_cell(st['what'])} |" for i, st in enumerate(rag["stages"]))
    examples = "\n".join(f"| {_cell(e['question'])} | {e['sources']} | `{_cell(e['reply'])}` |" for e in rag["examples"])
    return f"""
## Grounded answering (rag template)

Fine-tuned from the checkpoint above by `scripts/train_tiny_rag.py`, on conversations in the `rag` template from
`tiny_data.RagData`: 3–5 short documents about people (home, job, pet, colour, food, instrument; "Alice lives in
Paris."), a question answered by exactly one document (60 %), by two documents with one fact each ("Tell me about
Alice.", 25 %) or by the same fact in two documents (15 %), and the reply
`Relevant Documents: 1\\nCited Documents: 1\\nAnswer: Alice lives in Paris.\\nGrounded answer: <co: 1>Alice lives in Paris</co: 1>.`
(two documents: `<co: 0,2>…</co: 0,2>`, or one tagged claim per document). Each step mixes the original data (6 rows,
so the chat turns and induction heads stay), 16 *compact* rag rows (the conversation without the template's fixed
preamble and instructions, ~300 tokens), every second step 4 full-template rows (the ~400-token preamble runs once
without gradient and every row continues from its keys and values) and 4 rows of document-number drills
(`Documents about Iris: 0,2` after a rendered `<results>` block). Loss on the reply tokens only, 5× on the tokens that
carry the skill (document numbers, copied names and facts).

The hard part is the first line: 'Relevant Documents:' needs the number of the document that mentions the asked
person, a lookup *backwards* from the name to the `Document: i` header before it. For ~1000 steps the next-token loss
alone left it at chance (teacher-forced accuracy ~0.35) while everything else was learned. What made it learn,
each stage continuing from the previous one's checkpoint:

| stage | steps | what changed |
|---|---|---|
{stages}

The two supervised heads are ordinary heads of the model: an auxiliary loss, −log of the attention from each
'Relevant Documents' number to the asked person's name in that document's title (L{rag["lookup"][0]}H{rag["lookup"][1]}),
and from each title's name to its document's number (L{rag["carry"][0]}H{rag["carry"][1]}); the saved checkpoint is a plain
`CohereForCausalLM`. {rag["steps"]} steps in all, {rag["minutes"]:.1f} minutes of wall time on the shared 2-core machine.

Held-out accuracy during training: 16 questions (not the ones below), greedy; up to step 2300 the replies were cut at 90 tokens, which cut a quarter of the two-fact replies short, from step 2400 at 128. The readout stage's 200 steps (about 4 minutes) are not in the step count or the wall time.

| step | loss, original mixture | loss, rag replies | held-out accuracy (16 questions) | best induction score | loss, 2nd repeat |
|---|---|---|---|---|---|
{curve}

**Held-out accuracy: {rag["accuracy"]:.0%}** of {rag["n"]} new questions (greedy, `rag` template, default
preamble) answered from the right document(s) and citing exactly them (every fact value in the grounded answer, and
the `<co: …>` tags cite exactly the source documents); {rag["facts"]:.0%} copy the right fact(s), {rag["cites"]:.0%} cite the
right document(s). By kind: {", ".join(f"{k} {v:.0%}" for k, v in rag["by_kind"].items())}.

| question | source documents | greedy reply |
|---|---|---|
{examples}
"""


def write_model_card(folder: str, report: dict) -> None:
    """MODEL_CARD.md beside the checkpoint, with the numbers measured on the saved float16 weights."""
    cfg = json.load(open(os.path.join(folder, "config.json")))
    a = report["args"]
    tok = Tokenizer.from_pretrained(folder)
    n_bpe = tok.convert_tokens_to_ids("<|START_OF_TURN_TOKEN|>")
    all_ids, ordinary = report["all_ids"], report["ordinary_ids"]
    hist = report["history"]
    curve = "\n".join(f"| {h['step']} | {h['loss']:.3f} | {h['loss_first']:.2f} | {h['loss_second']:.2f} | "
                      f"{h['induction_max']:.2f} | {h['previous_max']:.2f} |" for h in hist)
    chats = "\n".join(f"| {_cell(q)} | `{_cell(r)}` |" for q, r in report["chat"].items())
    completions = "\n".join(f"| `{_cell(p)}` | `{_cell(c)}` |" for p, c in report["completions"].items())
    L, H = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    induction_rows = "\n".join(f"| {i} | " + " | ".join(f"{x:.2f}" for x in row) + " |"
                                for i, row in enumerate(all_ids["induction"]))
    previous_rows = "\n".join(f"| {i} | " + " | ".join(f"{x:.2f}" for x in row) + " |"
                               for i, row in enumerate(all_ids["previous"]))
    head_cols = " | ".join(f"H{h}" for h in range(H))
    n_random = round(a["batch"] * a["frac_random"])
    n_nat_rows = a["batch"] - n_random
    n_rand_rows = max(1, round(n_random * a["seq_len"] / a["rand_row_len"])) if n_random else 0
    sep = "|---" * (H + 1) + "|"
    defaults = {"threads": 2}
    command = "python scripts/train_tiny.py --out workbench/bundled/command-r-tiny" + "".join(
        f" --{k.replace('_', '-')} {a[k]}" for k, v in defaults.items() if a.get(k) != v)
    rag = report.get("rag")
    if rag:
        command = command.replace("--out workbench/bundled/command-r-tiny", "--out /tmp/tiny-base") + "\n" + rag["command"]
    cannot_rag = ("tool use (the `tool_use` template is there so the prompt format can be inspected and tokenized, "
                  "not because the model was trained on it); grounded answers beyond the synthetic people-and-facts "
                  "documents it was fine-tuned on" if rag else
                  "tool use or grounded generation (the `tool_use` and `rag` templates are there so the prompt formats "
                  "can be inspected and tokenized, not because the model was trained on them)")
    text = f"""# command-r-tiny

A {report["n_params"] / 1e6:.1f}M-parameter model with the **Command-R architecture** (`CohereForCausalLM`), trained
from scratch on the CPU by this project so that every workflow meant for the real 35B/104B checkpoints can be
tried in seconds, on a model with real learned structure. It is the workbench's embedded default:
`HookedCommandR.from_pretrained("command-r-tiny")`, `Tokenizer.from_pretrained("command-r-tiny")`.

It is a toy. It knows a few dozen templated facts and the chat turn format; it is not a language model
in any useful sense, and it has never seen text from the internet.

## Architecture (config.json)

| field | value | | field | value |
|---|---|---|---|---|
| hidden_size | {cfg["hidden_size"]} | | num_hidden_layers | {L} |
| num_attention_heads | {H} | | num_key_value_heads | {cfg["num_key_value_heads"]} (GQA, group {H // cfg["num_key_value_heads"]}) |
| head_dim | {cfg["head_dim"]} | | intermediate_size | {cfg["intermediate_size"]} (SwiGLU) |
| vocab_size | {cfg["vocab_size"]} ({len(tok)} tokenizer ids + padding rows, like Command-R's 255029 / 256000) | | use_qk_norm | {str(cfg["use_qk_norm"]).lower()} (every hook exists) |
| logit_scale | {cfg["logit_scale"]} | | rope_theta | {cfg["rope_theta"]:g} |
| tie_word_embeddings | {str(cfg["tie_word_embeddings"]).lower()} | | torch_dtype | {cfg["torch_dtype"]} (weights stored in float16) |
| bos / eos / pad ids | {cfg["bos_token_id"]} / {cfg["eos_token_id"]} (`<\\|END_OF_TURN_TOKEN\\|>`) / {cfg["pad_token_id"]} | | max_position_embeddings | {cfg["max_position_embeddings"]} (trained on {a["seq_len"]}-token rows) |

Parallel block with one fp32 LayerNorm, interleaved rotary embeddings, per-head QK-norm, tied unembedding
scaled by `logit_scale` — the same function as transformers' `CohereForCausalLM`, which loads this folder
and gives bit-identical logits to `HookedCommandR` on the explicit attention path (tests/test_tiny_model.py).

## Tokenizer

Command-R's pipeline, built with the `tokenizers` library (`scripts/build_tiny_tokenizer.py`): NFC normaliser;
pre-tokenizer `Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, trim_offsets=True,
use_regex=True)]`; byte-level BPE with the full 256-symbol byte alphabet (any text encodes; no `<UNK>`),
{n_bpe} entries trained on this project's generated text; ByteLevel decoder; `<BOS_TOKEN> $A` post-processor.
Ids 0–7 are Command-R's (`<PAD>` 0 … `<BOS_TOKEN>` 5 … `<EOP_TOKEN>` 7); the turn tokens
(`<|START_OF_TURN_TOKEN|>` {n_bpe}, `<|END_OF_TURN_TOKEN|>` {n_bpe + 1}, `<|USER_TOKEN|>` {n_bpe + 6},
`<|CHATBOT_TOKEN|>` {n_bpe + 7}, `<|SYSTEM_TOKEN|>` {n_bpe + 8}, `<|USER_0_TOKEN|>` …, `<|EXTRA_9_TOKEN|>`) follow
the BPE vocabulary, in Command-R's order. `tokenizer_config.json` carries this project's own `default`,
`tool_use` and `rag` chat templates, which produce the Command-R prompt format
(`<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello, how are you?<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>`).

## Training data (all generated by `scripts/tiny_data.py`, deterministic)

Each step sees {a["batch"] * a["seq_len"]} tokens, {a["frac_random"]:.0%} of them in repeated random rows:
* {n_rand_rows} rows of {a["rand_row_len"]} tokens packed with `<BOS_TOKEN> r r` segments, `r` = {a["rand_min"]}–{a["rand_max"]} token ids
  drawn uniformly from the whole embedding (0 … {cfg["vocab_size"] - 1}) — induction fodder (short rows: fewer
  distracting keys per query, a stronger signal for the induction circuit);
* {n_nat_rows} rows of {a["seq_len"]} tokens of packed documents, each starting with `<BOS_TOKEN>`: 45 % chat dialogues rendered with the
  `default` template (greetings, "What is the capital of France?", "What colour is the sky?", "What is 3 + 4?",
  animal sounds, opposites, the day after Monday, "Repeat after me: …", thanks/goodbye; optional system turn;
  1–3 exchanges, every assistant turn closed by `<|END_OF_TURN_TOKEN|>`), 30 % fact paragraphs
  ("The capital of Japan is Tokyo.", "The banana is yellow.", "3 + 4 = 7.", counting, days, months, word
  spans repeated twice), 10 % two-name stories ("Alice and Bob went to the park. Alice gave a kite to Bob."),
  15 % word/digit spans that occur twice ("Mia's code is 4 0 7 1. I repeat, Mia's code is 4 0 7 1.").

Facts: 33 capitals, 22 object colours, 11 animal sounds, 18 opposite pairs, single-digit addition and
subtraction, days of the week.

## Recipe

`HookedCommandR` in float32, autograd, fused attention; AdamW (β = 0.9, 0.95; weight decay {a["weight_decay"]} on
matrices, none on embeddings and norms), peak learning rate {a["lr"]:g} ({a["qk_norm_lr_mult"]:g}× that for the QK-norm weights:
QK-norm bounds every attention score by |w_q|·|w_k|·√d_head, so with unit weights no head can attend sharply
until those weights grow), {a["warmup"]} warm-up steps then cosine decay
to {a["min_lr_frac"]:g} × peak, gradient clipping {a["clip"]}, {a["steps"]} steps; normal(0, 0.02) init with residual-writing
projections scaled by 1/√(2·layers), embedding std {a.get("embed_std", 0.02)}. Seed {a["seed"]} (model init, data stream and random rows), tokenizer
corpus seed {a["seed"] + 1000}. `torch.set_num_threads({a["threads"]})`. Saved in float16 with Hugging Face tensor names.
Denormals are flushed to zero (`torch.set_flush_denormal(True)`): sharp attention otherwise produces denormal
floats in the backward pass that slowed a run tenfold.

Why these choices (trial runs, all otherwise like this recipe): with 8 heads of 32 dims, the base learning rate
on the QK-norm weights and 128-token random rows, previous-token heads reached only ~0.25 and no induction head
formed in 1000 steps; with the QK-norm multiplier previous-token heads reached ~0.5 but the loss on the
second repeat still sat at ln V after 450 steps. With four heads of 64 dims (twice the rank for the
previous-token head to pass on which token came before, and a higher bound on attention scores) copying
began near step 700 of a 1200-step run and was cut short by the decaying learning rate, hence
{a["steps"]} steps. A larger embedding init (std 0.1) did not speed it up. With half the tokens in random rows the
circuit formed around steps 1100–1200 of 2000; with three quarters (this recipe) around steps 900–1000. The
chat format is learned within ~300 steps either way.

Training took {report["train_time_s"] / 60:.1f} minutes of wall time on a 2-core machine shared with other jobs.

Training curve (loss = exponential moving average of the training loss; repeat losses, head scores on 8
held-out `<BOS_TOKEN> r r` sequences with |r| = 20):

| step | train loss | loss, 1st repeat | loss, 2nd repeat | best induction score | best previous-token score |
|---|---|---|---|---|---|
{curve}

**Final training loss {report["final_train_loss"]:.3f}** (mixture of unpredictable random tokens and templated text).

## Measured structure (saved float16 weights, loaded in float32; 16 sequences `<BOS_TOKEN> r r`, |r| = 20)

* Loss on the first repeat **{all_ids["loss_first"]:.2f}** nats vs **{all_ids["loss_second"]:.2f}** on the second repeat
  (ids drawn from the whole vocabulary); {ordinary["loss_first"]:.2f} vs {ordinary["loss_second"]:.2f} for ids ≥ 8.
* Induction heads (mean attention from a token of the second repeat to the token after its first
  occurrence): {_heads(all_ids["induction_top"])}.
* Previous-token heads (mean attention to position q − 1): {_heads(all_ids["previous_top"])}.

Induction scores (layer × head):

| layer | {head_cols} |
{sep}
{induction_rows}

Previous-token scores (layer × head):

| layer | {head_cols} |
{sep}
{previous_rows}

Greedy chat replies (default template, `add_generation_prompt=True`):

| user | reply |
|---|---|
{chats}

Greedy plain-text completions (3 tokens):

| prompt | completion |
|---|---|
{completions}

## What it can and cannot do

Can: reply in the Command-R turn format and close its turn with `<|END_OF_TURN_TOKEN|>`, with the answer
template that fits the question and the question's entity copied into it ("The capital of France is …");
copy repeated spans of arbitrary token ids (a clear induction circuit: the previous-token head in layer 1
feeding induction heads in layers 2–3; the logit lens shows the copied token appear only in the last layers);
continue simple sequences (days of the week). Some facts are recalled as the top prediction in plain text
("The capital of France is" → " Paris", "A cow says" → " moo", "The opposite of hot is" → " cold"), with
low confidence. So attention patterns, logit lens, head scores, attribution and activation patching show
real, interpretable effects.

Cannot: reliably recall the facts it was shown (in chat it often fills the template with a wrong capital or
colour; three quarters of its training tokens were random-id rows, the price of getting the induction
circuit within the CPU budget), do arithmetic (single-digit sums were in the data but are not learned),
anything outside its tiny templated world, long contexts (trained on {a["seq_len"]}-token rows{", plus rag prompts of ~1000 tokens" if rag else ""}), {cannot_rag}, multilingual text (every byte encodes, but only English was trained).
{rag_section(rag) if rag else ""}

## Reproduce

```
{command}
```

Deterministic on a given machine and PyTorch build (fixed seeds, single process); different CPUs or
PyTorch versions can change the last bits of the weights and therefore the exact numbers above.

## Licence

Apache-2.0, like the rest of this project. The training data, the tokenizer vocabulary and the three chat
templates were all produced by this project's own scripts; no third-party text, weights or templates are
included. The special-token strings and the prompt format follow Cohere's published Command-R format so
that the workbench treats this model exactly like the real checkpoints.
"""
    with open(os.path.join(folder, "MODEL_CARD.md"), "w", encoding="utf-8") as f:
        f.write(text)


def main() -> None:
    ap = argparse.ArgumentParser(description="Train the bundled command-r-tiny checkpoint on the CPU.")
    ap.add_argument("--out", default="workbench/bundled/command-r-tiny")
    ap.add_argument("--report", default="/tmp/command-r-tiny-report.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    add_optim_args(ap, lr=3e-3, warmup=50, qk_norm_lr_mult=10.0)
    ap.add_argument("--embed-std", type=float, default=0.02, help="init std of the (tied) embedding")
    ap.add_argument("--frac-random", type=float, default=0.75, help="share of the batch's tokens in [BOS] r r rows")
    ap.add_argument("--rand-min", type=int, default=8)
    ap.add_argument("--rand-max", type=int, default=30)
    ap.add_argument("--rand-row-len", type=int, default=64, help="length of the [BOS] r r rows")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--bpe-vocab", type=int, default=2000)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-layers", type=int, default=4)
    ap.add_argument("--n-heads", type=int, default=4)
    ap.add_argument("--n-kv-heads", type=int, default=2)
    ap.add_argument("--d-mlp", type=int, default=512)
    ap.add_argument("--max-positions", type=int, default=2048)
    ap.add_argument("--card-only", action="store_true",
                    help="do not train: re-evaluate --out and rewrite MODEL_CARD.md from the --report JSON")
    args = ap.parse_args()
    if args.card_only:
        with open(args.report) as f:
            report = json.load(f)
        args = argparse.Namespace(**{**report["args"], "out": args.out, "report": args.report})
        finish(args, report)
    else:
        train(args)


if __name__ == "__main__":
    main()
