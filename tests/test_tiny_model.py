"""The bundled ``command-r-tiny`` checkpoint: layout, tokenizer, templates, parity with transformers, and
the learned structure (chat turns, induction and previous-token heads, logit lens) that the notebooks and
the analysis functions rely on."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from workbench import HookedCommandR
from workbench.bundled import ALIASES, BUNDLED_MODELS, resolve_model_path
from workbench.tokenizer import Tokenizer

FOLDER = resolve_model_path("command-r-tiny")
DOCUMENTED_PROMPT = ("<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello, how are you?<|END_OF_TURN_TOKEN|>"
                     "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")
TOOLS = [
    {"name": "internet_search", "description": "Search the web for a query",
     "parameter_definitions": {"query": {"description": "what to search for", "type": "str", "required": True},
                               "max_results": {"description": "how many results", "type": "int"}}},
    {"name": "directly_answer", "description": "Answer without tools", "parameter_definitions": {}},
]
DOCUMENTS = [{"title": "Tall penguins", "text": "Emperor penguins are the tallest."},
             {"title": "Penguin habitats", "text": "Emperor penguins only live in Antarctica."}]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Who is the tallest penguin?"}]


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_pretrained(FOLDER)


@pytest.fixture(scope="module")
def model():
    """The saved float16 weights, upcast to float32 (exactly representable) for analysis."""
    m = HookedCommandR.from_pretrained(FOLDER, dtype=torch.float32)
    m.attn_impl = "explicit"
    return m


@pytest.fixture(scope="module")
def hf_tok():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(FOLDER)


def repeated(vocab_size: int, bos: int, seq_len: int = 20, n: int = 8, seed: int = 123) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    r = torch.randint(0, vocab_size, (n, seq_len), generator=gen)
    return torch.cat([torch.full((n, 1), bos), r, r], dim=1)            # [batch 1+2*seq_len]


def greedy_reply(model, tok, messages, max_new: int = 30) -> list[int]:
    """Greedy continuation of a chat prompt: ``model.generate`` when it exists, else a plain loop."""
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    prompt = prompt if isinstance(prompt, torch.Tensor) else prompt["input_ids"]
    try:
        out = model.generate(prompt, max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id)
    except ModuleNotFoundError:  # workbench.generation not written yet
        out = prompt
        with torch.no_grad():
            for _ in range(max_new):
                nxt = model(out)[:, -1].argmax(-1, keepdim=True)
                out = torch.cat([out, nxt], dim=1)
                if int(nxt) == tok.eos_token_id:
                    break
    return out[0, prompt.shape[1]:].tolist()


# ------------------------------------------------------------------------------------------- registry
def test_resolve_model_path_by_name_and_alias():
    assert os.path.isabs(FOLDER) and os.path.isdir(FOLDER)
    assert BUNDLED_MODELS["command-r-tiny"] == FOLDER
    for alias, target in ALIASES.items():
        assert resolve_model_path(alias) == BUNDLED_MODELS[target]
    with pytest.raises(KeyError, match="command-r-tiny"):  # the message lists the known names
        resolve_model_path("command-r-huge")


def test_loads_by_name(tok):
    assert Tokenizer.from_pretrained("command-r-tiny").encode("3 + 4 = 7") == tok.encode("3 + 4 = 7")
    m = HookedCommandR.from_pretrained("command-r-tiny")
    ref = HookedCommandR.from_pretrained(FOLDER)
    assert m.cfg.model_type == "cohere" and m.cfg.vocab_size == len(tok) + (-len(tok)) % 64
    assert torch.equal(m.embed.weight, ref.embed.weight)


# ------------------------------------------------------------------------------------------- layout
def test_folder_layout_config_and_size(tok):
    files = set(os.listdir(FOLDER))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "special_tokens_map.json", "MODEL_CARD.md"} <= files
    size = sum(os.path.getsize(os.path.join(FOLDER, f)) for f in files)
    assert size <= 15 * 2**20, f"bundled folder is {size / 2**20:.1f} MiB (limit 15)"

    cfg = json.load(open(os.path.join(FOLDER, "config.json")))
    assert cfg["architectures"] == ["CohereForCausalLM"] and cfg["model_type"] == "cohere"
    assert cfg["use_qk_norm"] is True and cfg["logit_scale"] == 0.0625 and cfg["torch_dtype"] == "float16"
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]
    assert cfg["tie_word_embeddings"] is True
    assert cfg["bos_token_id"] == 5 == tok.bos_token_id and cfg["pad_token_id"] == 0 == tok.pad_token_id
    assert cfg["eos_token_id"] == tok.convert_tokens_to_ids("<|END_OF_TURN_TOKEN|>") == tok.eos_token_id
    assert len(tok) <= cfg["vocab_size"] < len(tok) + 64          # padded rows, as in Command-R
    gen = json.load(open(os.path.join(FOLDER, "generation_config.json")))
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (5, cfg["eos_token_id"], 0)

    L = cfg["num_hidden_layers"]
    with safe_open(os.path.join(FOLDER, "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert all(f.get_slice(n).get_dtype() == "F16" for n in names)
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [cfg["vocab_size"], cfg["hidden_size"]]
    assert len(names) == 2 + 10 * L and "lm_head.weight" not in names        # tied, QK-norm present
    assert {f"model.layers.{L - 1}.self_attn.q_norm.weight", "model.norm.weight"} <= names


# ------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_json_pipeline_and_special_tokens(tok):
    spec = json.load(open(os.path.join(FOLDER, "tokenizer.json")))
    assert spec["normalizer"]["type"] == "NFC"
    pre = spec["pre_tokenizer"]["pretokenizers"]
    assert [p["type"] for p in pre] == ["Digits", "ByteLevel"] and pre[0]["individual_digits"] is True
    assert (pre[1]["add_prefix_space"], pre[1]["trim_offsets"], pre[1]["use_regex"]) == (False, True, True)
    assert spec["model"]["type"] == "BPE" and spec["model"]["byte_fallback"] is False
    assert spec["decoder"]["type"] == "ByteLevel"
    assert spec["post_processor"]["type"] == "TemplateProcessing"

    base = ["<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<EOP_TOKEN>"]
    assert [tok.convert_ids_to_tokens(i) for i in range(8)] == base
    n_bpe = len(spec["model"]["vocab"])
    turn = ["<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|YES_TOKEN|>", "<|NO_TOKEN|>",
            "<|GOOD_TOKEN|>", "<|BAD_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>",
            "<|USER_0_TOKEN|>"]
    assert [tok.convert_tokens_to_ids(t) for t in turn] == list(range(n_bpe, n_bpe + len(turn)))
    added = {t["id"]: t for t in spec["added_tokens"]}
    assert all(t["special"] and not t["normalized"] for t in added.values())

    text = "Grüße, 東京! 😀 12345\n\nThe capital of France is Paris."
    ids = tok.encode(text)
    assert ids[0] == 5 and 1 not in ids                           # BOS prepended; no <UNK> ever
    assert tok.decode(ids[1:]) == text
    assert tok.encode("12345", add_special_tokens=False) == [tok.convert_tokens_to_ids(d) for d in "12345"]


def test_tokenizer_config_format(tok):
    cfg = json.load(open(os.path.join(FOLDER, "tokenizer_config.json")))
    assert cfg["tokenizer_class"] == "CohereTokenizer" and cfg["padding_side"] == "left"
    assert cfg["add_bos_token"] is True and cfg["add_eos_token"] is False
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>", "<PAD>")
    assert [t["name"] for t in cfg["chat_template"]] == ["default", "tool_use", "rag"]
    decoder = cfg["added_tokens_decoder"]
    assert decoder["5"]["content"] == "<BOS_TOKEN>"
    assert decoder[str(tok.eos_token_id)]["content"] == "<|END_OF_TURN_TOKEN|>"


def test_default_template_documented_prompt(tok, hf_tok):
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    assert tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == DOCUMENTED_PROMPT
    assert hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == DOCUMENTED_PROMPT
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True)
    hf_ids = hf_ids if isinstance(hf_ids, list) else hf_ids["input_ids"]      # transformers 5 returns a mapping
    assert ids == list(hf_ids)
    assert ids[:3] == [5, tok.convert_tokens_to_ids("<|START_OF_TURN_TOKEN|>"),
                       tok.convert_tokens_to_ids("<|USER_TOKEN|>")]
    # a system turn (not stripped), stripped contents, no newlines between turns
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == ("<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Be brief.<|END_OF_TURN_TOKEN|>"
                    "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|>"
                    "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>Hello!<|END_OF_TURN_TOKEN|>"
                    "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Who is the tallest penguin?<|END_OF_TURN_TOKEN|>")
    assert hf_tok.apply_chat_template(CONVERSATION, tokenize=False) == text


@pytest.mark.parametrize("bad", [
    [{"role": "assistant", "content": "Hi"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "system", "content": "c"}],
])
def test_default_template_requires_alternation(tok, hf_tok, bad):
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template(bad, tokenize=False)
    with pytest.raises(Exception, match="alternate"):
        hf_tok.apply_chat_template(bad, tokenize=False)


def test_tool_use_template(tok, hf_tok):
    text = tok.apply_chat_template(CONVERSATION, tools=TOOLS, chat_template="tool_use", tokenize=False,
                                   add_generation_prompt=True)
    assert text == hf_tok.apply_chat_template(CONVERSATION, tools=TOOLS, chat_template="tool_use",
                                              tokenize=False, add_generation_prompt=True)
    assert text.startswith("<BOS_TOKEN><|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|># Safety Preamble")
    assert "# User Preamble\nBe brief.\n\n## Available Tools" in text
    assert ("```python\ndef internet_search(query: str, max_results: Optional[int] = None) -> List[Dict]:\n"
            '    """Search the web for a query\n\n    Args:\n        query (str): what to search for\n'
            '        max_results (Optional[int]): how many results\n    """\n    pass\n```') in text
    assert 'def directly_answer() -> List[Dict]:\n    """Answer without tools\n    """' in text
    conv = text.index("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hi<|END_OF_TURN_TOKEN|>")
    action = text.index("Write 'Action:'")
    assert conv < action and text.endswith("<|END_OF_TURN_TOKEN|><|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")
    assert text.count("<|SYSTEM_TOKEN|>") == 2                 # preamble + instruction (the system msg is the preamble)


@pytest.mark.parametrize("mode", ["accurate", "fast", None])
def test_rag_template(tok, hf_tok, mode):
    kwargs = {} if mode is None else {"citation_mode": mode}
    text = tok.apply_chat_template(CONVERSATION, documents=DOCUMENTS, chat_template="rag", tokenize=False,
                                   add_generation_prompt=True, **kwargs)
    assert text == hf_tok.apply_chat_template(CONVERSATION, documents=DOCUMENTS, chat_template="rag",
                                              tokenize=False, add_generation_prompt=True, **kwargs)
    assert ("<results>\nDocument: 0\ntitle: Tall penguins\ntext: Emperor penguins are the tallest.\n\n"
            "Document: 1\ntitle: Penguin habitats\n") in text
    assert text.index("Who is the tallest penguin?") < text.index("<results>") < text.index("Grounded answer:")
    assert ("'Answer:'" in text) == (mode != "fast")
    assert "Relevant Documents:" in text and "Cited Documents:" in text and "<co: 0>" in text
    if mode is None:
        with pytest.raises(Exception, match="citation_mode"):
            tok.apply_chat_template(CONVERSATION, documents=DOCUMENTS, chat_template="rag", tokenize=False,
                                    citation_mode="sloppy")


# ------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_transformers_parity(dtype, tok):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(FOLDER, dtype=dtype, attn_implementation="eager").eval()
    assert type(ref).__name__ == "CohereForCausalLM"
    ours = HookedCommandR.from_pretrained(FOLDER, dtype=dtype)
    ours.attn_impl = "explicit"
    chat_ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "What is 3 + 4?"}],
                                                     add_generation_prompt=True)])
    for ids in (chat_ids, repeated(ours.cfg.vocab_size, 5, seq_len=15, n=2)):
        with torch.no_grad():
            expected = ref(ids).logits
            got = ours(ids)
        assert got.dtype == dtype and torch.equal(got, expected)


# ------------------------------------------------------------------------------------------- structure
@pytest.mark.parametrize("question, starts_with", [
    ("Hello, how are you?", None),
    ("What is the capital of France?", "The capital of France is"),   # copies the entity from the question
    ("What does a cow say?", "A cow says moo."),
])
def test_chat_answers_and_ends_turn(model, tok, question, starts_with):
    reply = greedy_reply(model, tok, [{"role": "user", "content": question}])
    eot = tok.eos_token_id
    assert eot in reply, f"no <|END_OF_TURN_TOKEN|> in {tok.decode(reply)!r}"
    answer = reply[:reply.index(eot)]
    assert len(answer) >= 2 and not set(answer) & set(tok.added_tokens), tok.decode(reply)
    if starts_with:
        assert tok.decode(answer).startswith(starts_with), tok.decode(reply)


def test_chat_in_float16_matches_float32(model, tok):
    half = HookedCommandR.from_pretrained(FOLDER, dtype=torch.float16)
    messages = [{"role": "user", "content": "Hello, how are you?"}]
    assert greedy_reply(half, tok, messages) == greedy_reply(model, tok, messages)


def test_induction_loss_drop(model):
    tokens = repeated(model.cfg.vocab_size, 5)
    with torch.no_grad():
        logits = model(tokens).float()
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    # losses[:, j] predicts token j + 1: r[1:] of the first repeat, then r[1:] of the second (r[0] of the
    # second repeat follows r[19] nowhere earlier, so it is unpredictable and left out)
    first, second = losses[:, 1:20].mean(), losses[:, 21:40].mean()
    assert first > 5.0                       # the first repeat is unpredictable (ln 1792 = 7.5)
    assert second < 0.2 * first, (float(first), float(second))


def _pattern_scores(model, tokens, seq_len=20):
    """Independent reference for the analysis functions: scores straight from hook_pattern."""
    patterns = {}
    names = [f"blocks.{i}.attn.hook_pattern" for i in range(model.cfg.n_layers)]
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[(n, lambda p, hook: patterns.__setitem__(hook.layer, p))
                                                for n in names])
    q = torch.arange(1 + seq_len, 1 + 2 * seq_len)
    qp = torch.arange(1, tokens.shape[1])
    induction = torch.stack([patterns[i][:, :, q, q - seq_len + 1].mean((0, 2)) for i in range(len(names))])
    previous = torch.stack([patterns[i][:, :, qp, qp - 1].mean((0, 2)) for i in range(len(names))])
    return induction, previous


def test_induction_and_previous_token_heads_from_patterns(model):
    induction, previous = _pattern_scores(model, repeated(model.cfg.vocab_size, 5))
    assert induction.max() >= 0.5, induction
    assert previous.max() >= 0.5, previous
    # the mechanism: the previous-token head sits in an earlier layer than the best induction head
    assert (previous.argmax() // previous.shape[1]) < (induction.argmax() // induction.shape[1])
    assert induction.median() < 0.2                     # most heads are not induction heads


def test_analysis_head_scores_find_the_heads(model):
    analysis = pytest.importorskip("workbench.analysis", reason="workbench.analysis not written yet")
    tokens = analysis.repeated_random_tokens(model, seq_len=20, n_seqs=8, seed=0, bos_token_id=5)
    assert tokens.shape == (8, 41)
    induction = analysis.induction_scores(model, tokens=tokens, seq_len=20)
    previous = analysis.previous_token_scores(model, tokens)
    ref_induction, ref_previous = _pattern_scores(model, tokens)
    torch.testing.assert_close(induction.float(), ref_induction.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(previous.float(), ref_previous.float(), rtol=1e-4, atol=1e-5)
    assert induction.max() >= 0.5 and previous.max() >= 0.5
    default = analysis.induction_scores(model)           # its own random tokens
    assert default.shape == (model.cfg.n_layers, model.cfg.n_heads) and default.max() >= 0.5


def test_logit_lens_sees_copying_in_the_last_layer(model, tok):
    analysis = pytest.importorskip("workbench.analysis", reason="workbench.analysis not written yet")
    tokens = repeated(model.cfg.vocab_size, 5, n=4)
    target = tokens[:, 1:]                                              # next token at each position
    lens = analysis.logit_lens(model, tokens[:, :-1], top_k=5, target=target)
    assert lens.labels[0] == "resid_pre 0" and lens.labels[-1] == f"resid_post {model.cfg.n_layers - 1}"
    second = slice(21, 40)                                              # predicting r[1:] of the second repeat
    p = lens.target_prob[:, :, second].float().mean(dim=(1, 2))         # [n_resid]
    # absent from the embedding and the early residual stream; written by the last layer's induction heads
    assert p[0] < 0.01 and p[-2] < 0.05 and p[-1] > 0.2 and p[-1] > 5 * p[-2], p
    # the final lens row is the model's own prediction
    with torch.no_grad():
        final = model(tokens[:, :-1]).float().softmax(-1)
    torch.testing.assert_close(lens.target_prob[-1].float(), final.gather(-1, target[..., None])[..., 0],
                               rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("prompt, answer", [
    ("The capital of France is", " Paris"), ("A cow says", " moo"), ("The opposite of hot is", " cold"),
])
def test_logit_lens_facts_are_recalled_late(model, tok, prompt, answer):
    analysis = pytest.importorskip("workbench.analysis", reason="workbench.analysis not written yet")
    target = tok.encode(answer, add_special_tokens=False)
    assert len(target) == 1
    lens = analysis.logit_lens(model, torch.tensor([tok.encode(prompt)]), top_k=3, target=target[0])
    rank = lens.target_rank[:, 0, -1]                                   # [n_resid] at the last position
    assert int(rank[-1]) == 0                                           # the model's top prediction
    assert int(rank[0]) > 50                                            # nowhere near it at the embedding


# ------------------------------------------------------------------------------------------- grounded answering
def _rag_examples(n: int, seed: int = 313131) -> list:
    """Held-out synthetic rag conversations (a seed used neither in training nor for the model card)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
    from tiny_data import RagData

    data = RagData(seed)
    return [data.example() for _ in range(n)]


def test_rag_grounded_answers_cite_the_right_documents(model, tok):
    """>= 80% of held-out questions: every fact of the answer copied into the grounded answer, whose <co: ...>
    tags cite exactly the source document(s). Greedy, batched (left padding), one pass."""
    analysis = pytest.importorskip("workbench.analysis.rag_spans", reason="rag_spans not written yet")
    examples = _rag_examples(24)
    prompts = [tok.apply_chat_template(ex["messages"], documents=ex["documents"], chat_template="rag",
                                       add_generation_prompt=True) for ex in examples]
    T = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=128, do_sample=False,
                             eos_token_id=tok.eos_token_id)
    ok, failures = 0, []
    for ex, row in zip(examples, out[:, T:].tolist()):
        reply = tok.decode(row[:row.index(tok.eos_token_id)] if tok.eos_token_id in row else row)
        assert reply.startswith("Relevant Documents:"), reply                   # the rag reply format
        grounded = reply.split("Grounded answer:", 1)[-1] if "Grounded answer:" in reply else ""
        cited = {d for _, _, docs in analysis.parse_citations(grounded).regions for d in docs}
        good = cited == set(ex["sources"]) and all(v in grounded for v in ex["facts"])
        ok += good
        if not good:
            failures.append((ex["messages"][0]["content"], ex["sources"], reply))
    assert ok >= 0.8 * len(examples), f"{ok}/{len(examples)}; failures: {failures[:3]}"
