"""The training-data helpers of scripts/train_tiny_rag.py point at the right tokens: the skill tokens of a
reply, the document number each 'Relevant Documents' entry needs and the name it is looked up by, and each
title's name with its document's number. The bundled model's grounded answering was trained with these
targets, so a wrong position here would have trained the wrong thing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from tiny_data import RagData  # noqa: E402
from train_tiny_rag import compact_prompt, header_targets, lookup_targets, reply_slots  # noqa: E402

from workbench.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained("command-r-tiny")


@pytest.fixture(scope="module")
def examples():
    data = RagData(2024)
    return [data.example() for _ in range(40)]


def test_reply_slots_are_the_numbers_names_and_facts(tok, examples):
    for ex in examples:
        reply = tok.encode(ex["response"], add_special_tokens=False)
        slots = reply_slots(tok, ex, reply)
        text = lambda where: [tok.decode(reply[k:k + 1]).strip() for k in where]  # noqa: E731
        assert text(slots["rel"]) == [str(s) for s in ex["sources"]]
        person = ex["messages"][0]["content"]
        assert text(slots["name"])[0] in person
        assert all(t in " ".join(ex["facts"]) for t in text(slots["fact"])) and slots["fact"]
        cited = [d for part in ex["response"].split("<co: ")[1:] for d in part.split(">", 1)[0].split(",")]
        assert text(slots["cite"]) == cited


def test_lookup_targets_point_from_each_number_to_the_title_name(tok, examples):
    for ex in examples:
        prompt = compact_prompt(tok, ex)
        reply = tok.encode(ex["response"], add_special_tokens=False)
        ids = prompt + reply
        items = lookup_targets(tok, ex, prompt, reply)
        assert len(items) == len(ex["sources"])
        for (pos, where), doc in zip(items, ex["sources"]):
            assert tok.decode(ids[pos + 1:pos + 2]) == str(doc)            # the logits at pos predict the number
            name = ex["documents"][doc]["text"].split(" ", 1)[0]
            assert len(where) == 1 and tok.decode(ids[where[0]:where[0] + 1]) == " " + name
            header = tok.decode(ids[:where[0]])
            assert header.endswith(f"Document: {doc}\ntitle:")               # the name in that document's title


def test_header_targets_point_from_each_title_name_to_its_number(tok, examples):
    for ex in examples:
        prompt = compact_prompt(tok, ex)
        items = header_targets(tok, ex, prompt)
        assert len(items) == len(ex["documents"])
        for doc, (pos, [digit]) in enumerate(items):
            assert tok.decode(prompt[digit:digit + 1]) == str(doc) and digit < pos
            assert tok.decode(prompt[:digit + 1]).endswith(f"Document: {doc}")
            assert tok.decode(prompt[pos:pos + 1]) == " " + ex["documents"][doc]["text"].split(" ", 1)[0]
