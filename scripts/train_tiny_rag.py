"""Fine-tune the bundled ``command-r-tiny`` on grounded answering in its ``rag`` template (CPU, fixed seeds).

Starts from the checkpoint trained by ``train_tiny.py`` (so the induction heads and the chat turns are kept)
and trains on a mix of
  * the original data (``train_tiny.Batches``: chat dialogues, facts, stories, repeated spans and
    ``<BOS_TOKEN> r r`` rows of random ids),
  * retrieval-augmented conversations from ``tiny_data.RagData``: 3-5 short documents about people, a
    question answered by one or two of them, and the reply in the ``rag`` template's format
    (Relevant Documents / Cited Documents / Answer / Grounded answer with ``<co: i>...</co: i>`` markup), as
    full-template rows and as ``compact`` rows (the same conversation without the template's long fixed preamble
    and instructions, ~300 tokens),
  * ``index`` rows: document-number drills (``Documents about Iris: 0,2`` after a rendered ``<results>`` block),
  * optionally ``mini`` rows (plain-text drills of the same skill).

Loss on the replies only, ``--slot-weight`` times on the tokens that carry the skill (``reply_slots``).

The first line of the reply, 'Relevant Documents: i', needs a lookup *backwards*: from the asked person's
name to the ``Document: i`` header before the document that mentions it. With the next-token loss alone it
stayed at chance for ~1000 steps while the rest of the reply was learned. Two auxiliary losses on attention
(``--lookup-weight``: one head attends from each document number of the reply to the person's name in that
document's title; ``--carry-weight``: an earlier head attends from each title's name to its document's number)
made both heads attend as asked within ~100 steps, and a short ``--readout-steps`` stage (only those layers'
value/output maps trainable, loss on the document numbers alone) taught the lookup to write the number; the
mixture then recovered and kept everything else. The bundled checkpoint is a chain of such runs, each from the
previous one's checkpoint; its model card lists every stage with its command (``--write-card`` writes it).

The ``rag`` prompt starts with a long fixed preamble (~400 tokens, identical for every question without a
system message): each full-template step runs it once, without gradient, and every conversation of the step
continues from its keys and values (``KVCache.update`` with the prefix broadcast over the batch).

Smoke run::

    python scripts/train_tiny_rag.py --out /tmp/tiny-rag-smoke --steps 4 --eval-every 2 --eval-n 2
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
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
from train_tiny import (Batches, add_optim_args, chat, evaluate, make_optimizer, mixture_backward,  # noqa: E402
                        repeated_tokens, setup_torch, start_step, structure_metrics, structure_row,
                        write_model_card)

from workbench import HookedCommandR  # noqa: E402
from workbench.hook_names import act_name  # noqa: E402
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

    def __init__(self, tok: Tokenizer, n: int, seed: int, slot_weight: float = 1.0) -> None:
        self.tok, self.n, self.slot_weight = tok, n, slot_weight
        self.data = RagData(seed)
        self.prefix = shared_prefix(tok)
        ex = RagData(seed).example()
        text = tok.apply_chat_template(ex["messages"], documents=ex["documents"], chat_template="rag",
                                       add_generation_prompt=True, tokenize=False)
        self.instructions = tok.encode(text[text.index("</results>"):], add_special_tokens=False)[:-1]

    def next(self) -> dict:
        P, B = len(self.prefix), self.instructions
        a_rows, c_rows, labels, weights = [], [], [], []
        for _ in range(self.n):
            ex = self.data.example()
            prompt = rag_prompt(self.tok, ex)
            assert prompt[:P] == self.prefix, "rag prompt does not start with the shared prefix"
            assert prompt[-len(B) - 1:-1] == B, "rag prompt does not end with the fixed instructions"
            reply = self.tok.encode(ex["response"], add_special_tokens=False) + [self.tok.eos_token_id]
            a_rows.append(prompt[P:-len(B) - 1])
            c_rows.append(prompt[-1:] + reply)
            labels.append(reply + [-100])                               # label at j = token j + 1
            weights.append(slot_weights(self.tok, ex, reply, self.slot_weight) + [0.0])
        La, Lc = max(map(len, a_rows)), max(map(len, c_rows))
        a = torch.full((self.n, La), self.tok.pad_token_id)
        c = torch.full((self.n, Lc), self.tok.pad_token_id)
        y = torch.full((self.n, Lc), -100)
        w = torch.zeros(self.n, Lc)
        for i, (ra, rc, lab, wt) in enumerate(zip(a_rows, c_rows, labels, weights)):
            a[i, :len(ra)], c[i, :len(rc)], y[i, :len(lab)] = torch.tensor(ra), torch.tensor(rc), torch.tensor(lab)
            w[i, :len(wt)] = torch.tensor(wt)
        return {"a": a, "a_len": torch.tensor([len(r) for r in a_rows]), "b": torch.tensor(B), "c": c,
                "c_len": torch.tensor([len(r) for r in c_rows]), "labels": y, "weights": w}


def title_names(tok: Tokenizer, example: dict, prompt: list[int]) -> list[tuple[int, int]]:
    """For every document of ``prompt``: (position of its number in the ``Document: i`` header, position of the
    person's name in its title, the name's first occurrence after the number)."""
    pieces = [tok.decode([t]) for t in prompt]
    headers = [i for i in range(len(prompt) - 3) if pieces[i:i + 3] == ["D", "o", "c"] and pieces[i - 1] == "\n"]
    assert len(headers) == len(example["documents"]), "document headers not found in the prompt"
    out = []
    for doc, h in enumerate(headers):
        digit = next(i for i in range(h, len(prompt)) if pieces[i] == str(doc))
        name = " " + example["documents"][doc]["text"].split(" ", 1)[0]
        out.append((digit, next(i for i in range(digit, len(prompt)) if pieces[i] == name)))
    return out


def lookup_targets(tok: Tokenizer, example: dict, prompt: list[int], reply: list[int]) -> list[tuple[int, list[int]]]:
    """For each document number after 'Relevant Documents: ': (the position in ``prompt + reply`` whose logits
    predict it, [the position of the person's name in that document's title]). Used to supervise one attention
    head to look up the document that mentions the asked person (see ``attention_lookup_loss``)."""
    titles = title_names(tok, example, prompt)
    rel = reply_slots(tok, example, reply)["rel"]
    return [(len(prompt) - 1 + k, [titles[doc][1]]) for k, doc in zip(rel, example["sources"])]


def header_targets(tok: Tokenizer, example: dict, prompt: list[int]) -> list[tuple[int, list[int]]]:
    """For every document: (position of the person's name in its title, [position of the document's number in its
    ``Document: i`` header]). Used to supervise one earlier head to carry each document's number onto its name."""
    return [(title, [digit]) for digit, title in title_names(tok, example, prompt)]


def attention_lookup_loss(q: torch.Tensor, k: torch.Tensor, head: int, items: list) -> torch.Tensor:
    """Mean over ``items`` (row, query position, target positions) of -log(attention of ``head`` from the query to
    the targets), from the layer's rotated queries ``q`` [batch pos head d_head] and keys ``k`` [batch pos kv_head
    d_head] (causal; the rows are right-padded, so no query sees padding)."""
    group = q.shape[2] // k.shape[2]
    losses = []
    for row, pos, targets in items:
        scores = k[row, :pos + 1, head // group] @ q[row, pos, head] * q.shape[-1] ** -0.5     # [k_pos]
        logp = scores.float().log_softmax(-1)
        losses.append(-torch.logsumexp(logp[targets], 0))
    return torch.stack(losses).mean()


def slot_weights(tok: Tokenizer, example: dict, reply: list[int], weight: float, base: float = 1.0,
                 kinds: tuple | None = None) -> list[float]:
    """Per reply token: ``weight`` on the tokens that carry the skill (``reply_slots``: document numbers, copied
    names and facts; only the slot ``kinds`` when given), ``base`` elsewhere. Once the fixed reply format is learned (within ~150 steps) most of the loss
    is on format tokens the model already predicts; weighting the lookup tokens keeps their gradient from being
    averaged away."""
    w = [base] * len(reply)
    for kind, where in reply_slots(tok, example, reply).items():
        for k in where if kinds is None or kind in kinds else []:
            w[k] = weight
    return w


def compact_prompt(tok: Tokenizer, example: dict) -> list[int]:
    """The ``rag`` prompt without its long fixed parts: ``<BOS_TOKEN>``, the user turn, the documents' system
    turn exactly as the template writes it, and the generation prompt (~150 tokens instead of ~1000)."""
    text = tok.apply_chat_template(example["messages"], documents=example["documents"], chat_template="rag",
                                   add_generation_prompt=True, tokenize=False)
    end = "</results><|END_OF_TURN_TOKEN|>"
    body = text[text.index(USER_TURN):text.index(end) + len(end)]
    return tok.encode("<BOS_TOKEN>" + body + "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>", add_special_tokens=False)


class CompactBatches:
    """Per step: ``n`` short rag rows (``compact_prompt`` + reply), right-padded ``[n, T]`` with labels and loss
    weights on the reply: the same lookup and citation skill at short range, many conversations per step."""

    def __init__(self, tok: Tokenizer, n: int, seed: int, slot_weight: float = 1.0, base: float = 1.0,
                 kinds: tuple | None = None) -> None:
        self.tok, self.n, self.weights = tok, n, {"weight": slot_weight, "base": base, "kinds": kinds}
        self.data = RagData(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list, list]:
        rows, labels, weights, lookups, carries = [], [], [], [], []
        for _ in range(self.n):
            ex = self.data.example()
            prompt = compact_prompt(self.tok, ex)
            reply = self.tok.encode(ex["response"], add_special_tokens=False) + [self.tok.eos_token_id]
            rows.append(prompt + reply)
            labels.append([-100] * (len(prompt) - 1) + reply + [-100])
            weights.append([0.0] * (len(prompt) - 1) + slot_weights(self.tok, ex, reply, **self.weights) + [0.0])
            lookups += [(len(rows) - 1, pos, where) for pos, where in lookup_targets(self.tok, ex, prompt, reply)]
            carries += [(len(rows) - 1, pos, where) for pos, where in header_targets(self.tok, ex, prompt)]
        T = max(map(len, rows))
        x = torch.full((self.n, T), self.tok.pad_token_id)
        y = torch.full((self.n, T), -100)
        w = torch.zeros(self.n, T)
        for i, (r, lab, wt) in enumerate(zip(rows, labels, weights)):
            x[i, :len(r)], y[i, :len(lab)], w[i, :len(wt)] = torch.tensor(r), torch.tensor(lab), torch.tensor(wt)
        return x, y, w, lookups, carries


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


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits`` [n pos vocab] against ``labels`` [n pos] (-100: none), weighted per token."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")  # [n pos]
    return (ce * weights).sum() / weights.sum()


class IndexBatches:
    """Per step: ``n`` rows of ``row_len`` tokens packed with document-number drills: a ``rag`` results block exactly
    as the template renders it (``<results>\nDocument: 0\ntitle: ...\ntext: ...\n...</results>``), then one line
    per person named in it, in random order, ``Documents about Iris: 0,2`` (labels on the numbers only). Every
    line is the lookup that 'Relevant Documents:' needs (the documents that mention a person), with the person given
    right before it: several lookups per block, a dense signal for the hardest step of the reply."""

    def __init__(self, tok: Tokenizer, n: int, seed: int, row_len: int = 256) -> None:
        self.tok, self.n, self.row_len = tok, n, row_len
        self.data = RagData(seed)
        self.rng = random.Random(seed)

    def segment(self) -> tuple[list[int], list[int]]:
        docs = self.data.example()["documents"]
        block = "".join(f"\nDocument: {i}\n" + "".join(f"{k}: {v}\n" for k, v in d.items()) for i, d in enumerate(docs))
        head = self.tok.encode("<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>" + block
                               + "</results><|END_OF_TURN_TOKEN|>", add_special_tokens=False)
        owners: dict = {}
        for i, d in enumerate(docs):
            owners.setdefault(d["text"].split(" ", 1)[0], []).append(i)
        x, y = list(head), [-100] * len(head)
        for name in self.rng.sample(sorted(owners), len(owners)):
            q = self.tok.encode(f"\nDocuments about {name}:", add_special_tokens=False)
            a = self.tok.encode(" " + ",".join(map(str, owners[name])), add_special_tokens=False)
            x += q + a
            y += [-100] * len(q) + a
        return x, y

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for _ in range(self.n):
            x, y = [], []
            while len(x) < self.row_len + 1:
                a, b = self.segment()
                x += [self.tok.bos_token_id] + a
                y += [-100] + b
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
                 max_new: int = 128, batch: int = 8, compact: bool = False) -> dict:
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


def reply_slots(tok: Tokenizer, example: dict, reply: list[int]) -> dict[str, list[int]]:
    """Indices into ``reply`` of the tokens that carry the skill: ``rel`` the document numbers after
    'Relevant Documents: ', ``name`` the first token of the Answer (the person, copied from the question),
    ``fact`` the copied values in the Answer line, ``cite`` the numbers inside the grounded answer's ``<co: ...>``."""
    text = example["response"]
    ends = [len(tok.decode(reply[:k + 1])) for k in range(len(reply))]
    starts = [0] + ends[:-1]

    def overlapping(a: int, b: int) -> list[int]:
        return [k for k in range(len(reply)) if starts[k] < b and ends[k] > a]

    rel_a = len("Relevant Documents: ")
    answer = text.index("Answer: ") + len("Answer: ")
    grounded = text.index("Grounded answer:")
    slots = {"rel": overlapping(rel_a, text.index("\n")), "name": overlapping(answer, answer + 1),
             "fact": [k for v in example["facts"] for k in overlapping(text.index(v, answer), text.index(v, answer) + len(v))],
             "cite": [k for m in re.finditer(r"<co: ([0-9,]+)>", text[grounded:])
                      for k in overlapping(grounded + m.start(1), grounded + m.end(1))],
             "gname": [k for m in re.finditer(r"<co: [0-9,]+>", text[grounded:])
                       for k in overlapping(grounded + m.end(), grounded + m.end() + 1)]}
    return {k: [i for i in v if tok.decode(reply[i:i + 1]).strip(" ,")] for k, v in slots.items()}


@torch.no_grad()
def probe(model: HookedCommandR, tok: Tokenizer, n: int, seed: int, compact: bool) -> dict:
    """Teacher-forced accuracy of the next-token argmax at each kind of skill token (``reply_slots``) over ``n``
    held-out conversations: a smoother signal than greedy replies while the lookup is being learned."""
    data = RagData(seed)
    hits: dict = {k: [] for k in ("rel", "name", "fact", "cite", "gname")}
    for _ in range(n):
        ex = data.example()
        prompt = (compact_prompt if compact else rag_prompt)(tok, ex)
        reply = tok.encode(ex["response"], add_special_tokens=False)
        logits = model(torch.tensor([prompt + reply]))[0]                     # [pos vocab]
        pred = logits[len(prompt) - 1:-1].argmax(-1).tolist()                 # prediction of reply token k
        for kind, where in reply_slots(tok, ex, reply).items():
            hits[kind] += [pred[k] == reply[k] for k in where]
    return {k: round(sum(v) / max(len(v), 1), 3) for k, v in hits.items()}


# ----------------------------------------------------------------------------------------- training
def save(model: HookedCommandR, init: str, out: str) -> None:
    """Float16 weights + config + generation_config + the (unchanged) tokenizer files."""
    os.makedirs(out, exist_ok=True)
    half = copy.deepcopy(model).half().eval()
    half.save_pretrained(out)
    for name in TOKENIZER_FILES + ["generation_config.json"]:
        src = os.path.join(init, name)
        if os.path.abspath(src) != os.path.abspath(os.path.join(out, name)):
            shutil.copyfile(src, os.path.join(out, name))


def value_output_params(model: HookedCommandR, layers) -> list:
    """The value and output projection weights of the attention in ``layers``."""
    return [p for n, p in model.named_parameters()
            if any(n.startswith(f"blocks.{i}.attn.{w}") for i in set(layers) for w in ("v_proj", "o_proj"))]


def boost_value_output(opt: torch.optim.Optimizer, model: HookedCommandR, layers: list[int], mult: float) -> None:
    """Move the value and output projections of ``layers`` into their own parameter group with ``mult`` x the
    learning rate. Once a head attends to the right document, its value/output maps must learn to read the
    document's number there and write it as a logit; at the base rate that took hundreds of steps (a test with
    only those maps trainable: chance after 60 steps at 1e-3, 60 % at 1e-2)."""
    chosen = {id(p) for p in value_output_params(model, layers)}
    decay = opt.param_groups[0]
    fast = [p for p in decay["params"] if id(p) in chosen]
    decay["params"] = [p for p in decay["params"] if id(p) not in chosen]
    opt.add_param_group({"params": fast, "weight_decay": decay["weight_decay"], "lr_mult": mult})


def readout_stage(model: HookedCommandR, tok: Tokenizer, args) -> list:
    """Train only the value/output projections of the lookup and carry layers, on the loss of the 'Relevant
    Documents' numbers alone (Adam, ``args.readout_lr``, ``args.readout_steps`` steps of ``args.compact_batch``
    compact rows). With the two heads already attending to the right places, this teaches the maps that read the
    document's number from the attended name and write it as a logit, without the rest of the mixture pulling
    the same weights elsewhere. Returns the probe rows."""
    chosen = value_output_params(model, [args.lookup_layer, args.carry_layer])
    frozen = [p for p in model.parameters() if all(p is not c for c in chosen)]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(chosen, lr=args.readout_lr)
    data = CompactBatches(tok, args.compact_batch, args.seed + 60, 1.0, base=0.0, kinds=("rel",))
    rows = []
    for step in range(args.readout_steps):
        x, y, rel, _, _ = data.next()                 # loss weight 1 on the rel numbers, 0 elsewhere
        loss = weighted_loss(model(x), y, rel)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % args.probe_every == 0 or step + 1 == args.readout_steps:
            model.eval()
            row = {"readout_step": step + 1, "loss": round(loss.item(), 4),
                   **probe(model, tok, args.probe_n, HELD_OUT_SEED + 2, compact=True)}
            model.train()
            rows.append(row)
            print("readout", row, flush=True)
    for p in frozen:
        p.requires_grad_(True)
    return rows


def train(args) -> dict:
    setup_torch(args)
    tok = Tokenizer.from_pretrained(args.init)
    model = HookedCommandR.from_pretrained(args.init, dtype=torch.float32)
    model.train()
    model.attn_impl = "fused"
    cfg = model.cfg
    readout = readout_stage(model, tok, args) if args.readout_steps else []
    opt = make_optimizer(model, args)
    if args.ov_lr_mult != 1.0:
        boost_value_output(opt, model, [args.lookup_layer, args.carry_layer], args.ov_lr_mult)
    old = Batches(tok, cfg.vocab_size, 128, args.old_batch, 0.75, args.seed + 10, (8, 30), 64)
    rag = RagBatches(tok, args.rag_batch, args.seed + 20, args.slot_weight)
    compact = CompactBatches(tok, args.compact_batch, args.seed + 30, args.slot_weight)
    run_c = None
    mini, run_m = MiniBatches(tok, args.mini_batch, args.seed + 40), None
    index, run_i = IndexBatches(tok, args.index_batch, args.seed + 50), None
    run_a = None
    eval_tokens = repeated_tokens(cfg.vocab_size, tok.bos_token_id, 20, 8, seed=99)
    history, t0, run_old, run_rag, step = [], time.time(), None, None, -1
    for step in range(args.steps):
        start_step(opt, step, args)
        lo = mixture_backward(model, old.next())
        if args.full_every and step % args.full_every == 0:
            batch = rag.next()
            logits = rag_logits(model, rag.prefix, batch)                 # [batch pos vocab]
            rag_loss = weighted_loss(logits, batch["labels"], batch["weights"])
            (args.rag_weight * rag_loss).backward()
            lr_ = rag_loss.item()
            run_rag = lr_ if run_rag is None else 0.95 * run_rag + 0.05 * lr_
        if args.mini_batch:
            x, y = mini.next()
            m_loss = F.cross_entropy(model(x).float().reshape(-1, cfg.vocab_size), y.reshape(-1), ignore_index=-100)
            m_loss.backward()
            run_m = m_loss.item() if run_m is None else 0.95 * run_m + 0.05 * m_loss.item()
        if args.index_batch:
            x, y = index.next()
            i_loss = F.cross_entropy(model(x).float().reshape(-1, cfg.vocab_size), y.reshape(-1), ignore_index=-100)
            (args.index_weight * i_loss).backward()
            run_i = i_loss.item() if run_i is None else 0.95 * run_i + 0.05 * i_loss.item()
        if args.compact_batch:
            x, y, w, lookups, carries = compact.next()
            if args.lookup_weight:
                seen: dict = {}
                names = [act_name(kind, layer) for layer in (args.lookup_layer, args.carry_layer)
                         for kind in ("rot_q", "rot_k")]
                logits = model.run_with_hooks(x, fwd_hooks=[(n, lambda t, hook: seen.__setitem__(hook.name, t))
                                                            for n in names])
                a_loss = attention_lookup_loss(seen[names[0]], seen[names[1]], args.lookup_head, lookups)
                if args.carry_weight:
                    a_loss = a_loss + args.carry_weight * attention_lookup_loss(seen[names[2]], seen[names[3]],
                                                                                args.carry_head, carries)
                c_loss = weighted_loss(logits, y, w) + args.lookup_weight * a_loss
                run_a = a_loss.item() if run_a is None else 0.95 * run_a + 0.05 * a_loss.item()
            else:
                c_loss = weighted_loss(model(x), y, w)
            (args.compact_weight * c_loss).backward()
            run_c = c_loss.item() if run_c is None else 0.95 * run_c + 0.05 * c_loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        run_old = lo if run_old is None else 0.95 * run_old + 0.05 * lo
        if (step + 1) % args.log_every == 0:
            print(f"step {step + 1} old {run_old:.4f} rag {run_rag or 0:.4f} compact {run_c or 0:.4f} "
                  f"mini {run_m or 0:.4f} index {run_i or 0:.4f} lookup {run_a or 0:.4f} {time.time() - t0:.0f}s", flush=True)
        if args.probe_every and (step + 1) % args.probe_every == 0:
            model.eval()
            short = probe(model, tok, args.probe_n, HELD_OUT_SEED + 2, compact=True)
            full = probe(model, tok, max(args.probe_n // 4, 2), HELD_OUT_SEED + 2, compact=False)
            print(f"probe step {step + 1} compact {short} full {full}", flush=True)
            model.train()
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            model.attn_impl = "explicit"
            m = structure_metrics(model, eval_tokens, 20)
            acc = rag_accuracy(model, tok, args.eval_n, seed=HELD_OUT_SEED + 1)   # not the test's questions
            short = rag_accuracy(model, tok, args.eval_n, seed=HELD_OUT_SEED + 1, compact=True)
            row = {"step": step + 1, "old_loss": round(run_old, 4), "rag_loss": round(run_rag or 0, 4),
                   "time_s": round(time.time() - t0, 1), "rag_accuracy": acc["accuracy"],
                   "rag_facts": acc["facts"], "rag_cites": acc["cites"], "compact_accuracy": short["accuracy"],
                   **structure_row(m)}
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
    report = {"history": history, "train_time_s": round(time.time() - t0, 1), "steps_done": step + 1, "readout": readout,
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


def write_card(out: str, base_card: str, reports: list) -> dict:
    """Measure the saved checkpoint ``out`` and write its MODEL_CARD.md (base run + fine-tuning + rag numbers).
    ``reports``: the fine-tuning reports of the stages in order, each continuing from the previous one's checkpoint
    (``resume_step``: the step of the combined history it continued from; ``stage``: what it changed;
    ``command``: how it was run)."""
    report = base_report(base_card)
    model = HookedCommandR.from_pretrained(out, dtype=torch.float32)
    report["n_params"] = sum(p.numel() for p in model.parameters())
    report.update(evaluate(out, 0))
    tok = Tokenizer.from_pretrained(out)
    acc = rag_accuracy(model, tok, 100, seed=HELD_OUT_SEED)
    history, offset, seconds, stages = [], 0, 0.0, []
    for r in reports:
        upto = r.get("resume_step")                       # the earlier run's rows after it are not in the model
        if upto is not None:
            history = [h for h in history if h["step"] <= upto]
            offset = upto
            seconds = next((h["time_s"] for h in history if h["step"] == upto), seconds)
        history += [{**h, "step": h["step"] + offset, "time_s": h["time_s"] + seconds} for h in r["history"]]
        offset, seconds = history[-1]["step"], history[-1]["time_s"]
        stages.append({"steps": r["steps_done"], "what": r["stage"]})
    last = reports[-1]["args"]
    report["rag"] = {**acc, "history": history, "args": last, "steps": history[-1]["step"], "stages": stages,
                     "minutes": history[-1]["time_s"] / 60, "command": "\n".join(r["command"] for r in reports),
                     "lookup": (last["lookup_layer"], last["lookup_head"]), "carry": (last["carry_layer"], last["carry_head"])}
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
    ap.add_argument("--rag-batch", type=int, default=4, help="rag conversations per full-template step")
    ap.add_argument("--full-every", type=int, default=1, help="run the full-template rows every N steps (0: never)")
    ap.add_argument("--probe-every", type=int, default=50, help="teacher-forced skill probe every N steps (0: never)")
    ap.add_argument("--probe-n", type=int, default=32)
    ap.add_argument("--index-batch", type=int, default=0, help="256-token rows of document-number drills per step")
    ap.add_argument("--index-weight", type=float, default=1.0)
    ap.add_argument("--lookup-weight", type=float, default=0.0,
                    help="weight of the attention-lookup loss (one head attends from each 'Relevant Documents' number "
                         "to the asked person's name in that document)")
    ap.add_argument("--lookup-layer", type=int, default=3)
    ap.add_argument("--lookup-head", type=int, default=0)
    ap.add_argument("--carry-weight", type=float, default=0.0,
                    help="weight of the loss that has one earlier head attend from each title's name to its "
                         "document's number")
    ap.add_argument("--carry-layer", type=int, default=2)
    ap.add_argument("--readout-steps", type=int, default=0,
                    help="first train only the lookup/carry layers' value/output maps on the document numbers")
    ap.add_argument("--readout-lr", type=float, default=1e-2)
    ap.add_argument("--ov-lr-mult", type=float, default=1.0,
                    help="learning-rate multiplier on the value/output projections of the lookup and carry layers")
    ap.add_argument("--carry-head", type=int, default=0)
    ap.add_argument("--slot-weight", type=float, default=1.0,
                    help="loss weight on the reply's lookup tokens (document numbers, copied names and facts)")
    ap.add_argument("--rag-weight", type=float, default=1.0)
    ap.add_argument("--compact-batch", type=int, default=12, help="short rag rows (no preamble) per step")
    ap.add_argument("--compact-weight", type=float, default=1.0)
    ap.add_argument("--mini-batch", type=int, default=0, help="256-token rows of packed plain-text drills per step")
    add_optim_args(ap, lr=1.5e-3, warmup=30, qk_norm_lr_mult=3.0)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-n", type=int, default=16)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--write-card", nargs="+", metavar="REPORT",
                    help="instead of training: measure --out and write its MODEL_CARD.md from these stage reports "
                         "(finetune_report.json files, in order) and the base card --init/MODEL_CARD.md")
    args = ap.parse_args()
    if args.write_card:
        base = open(os.path.join(args.init, "MODEL_CARD.md")).read()
        write_card(args.out, base, [json.load(open(f)) for f in args.write_card])
        return
    os.makedirs(args.ckpt, exist_ok=True)
    train(args)


if __name__ == "__main__":
    main()
