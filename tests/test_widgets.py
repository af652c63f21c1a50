"""Python-level tests of the widgets' state: which tokens, which slice, which cells (no browser).

The browser side (rendering, escaping in the DOM, live updates) is in test_widgets_browser.py.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ipywidgets.widgets.widget import _remove_buffers

from workbench import CommandRConfig, HookedCommandR
from workbench.analysis import logit_lens
from workbench.tokenizer import Tokenizer
from workbench.widgets import AttentionView, GenerationView, LogitLensView, TokenView
from workbench.widgets._base import STATIC, RecordCache, from_f16, from_i32, from_u8, token_records

HOSTILE = "<img src=x onerror=alert(1)>"
SHARED = Path(__file__).resolve().parents[2] / "shared"


def small_tokenizer() -> Tokenizer:
    """A byte-level BPE trained on a few ASCII sentences (so Korean and emoji split into byte tokens), with the
    Command-R special tokens and one hostile added token."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as Backend

    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = ["<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>",
                "<|END_OF_TURN_TOKEN|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["the cat sat on the mat. the dog ate the cat. a b c d"] * 20, trainer)
    backend.add_tokens([AddedToken(HOSTILE, normalized=False)])
    return Tokenizer(backend, {"bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>",
                               "pad_token": "<PAD>", "add_bos_token": True})


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return small_tokenizer()


@pytest.fixture(scope="module")
def model(tok) -> HookedCommandR:
    cfg = CommandRConfig(vocab_size=320, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=128,
                         use_qk_norm=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    return HookedCommandR.from_config(cfg, seed=0).eval()


def no_hooks(model) -> bool:
    return all(not hp.has_hooks for hp in model.hook_dict.values())


def decoded(widget, key, shape_key=None, kind="f16"):
    state, _, buffers = _remove_buffers(widget.get_state())
    data = getattr(widget, key)
    shape = getattr(widget, shape_key) if isinstance(shape_key, str) else shape_key
    return {"f16": from_f16, "i32": from_i32, "u8": from_u8}[kind](data, shape)


# ------------------------------------------------------------------------------------------------ TokenView
def test_token_view_records(tok):
    text = "the cat\t안녕 👋\n" + HOSTILE
    view = TokenView(tok, text)
    ids = tok.encode(text)
    assert view.ids == ids and [r["id"] for r in view.tokens] == ids
    recs = view.tokens
    assert recs[0]["text"] == "<BOS_TOKEN>" and recs[0]["special"]
    assert view.text == tok.decode(ids)
    by_text = [r["text"] for r in recs]
    assert "·cat" in by_text and "→" in by_text and "↵" in by_text    # space, tab, newline visible
    assert [r for r in recs if r["text"] == "↵"][0]["newline"]
    # Korean and emoji are split into byte tokens: each shows its byte, all share the character's span.
    for ch, n_bytes in (("안", 3), ("녕", 3), ("👋", 4)):
        sharing = [r for r in recs if r["chars"] == ch]
        assert len(sharing) == n_bytes and all(r["partial"] for r in sharing)
        assert len({(r["start"], r["end"]) for r in sharing}) == 1
        assert bytes.fromhex("".join(r["hex"] for r in sharing).replace(" ", "")) == ch.encode()
        assert all(re.fullmatch(r"<0x[0-9A-F]{2}>", r["text"]) for r in sharing)
        start, end = sharing[0]["start"], sharing[0]["end"]
        assert view.text[start:end] == ch
    hostile = recs[-1]
    assert hostile["text"] == HOSTILE and hostile["chars"] == HOSTILE and hostile["hex"] == HOSTILE.encode().hex(" ")


def test_record_cache_matches_full_recomputation(tok):
    """Streaming records (tail recomputed) equal records of the whole sequence at every length, also while a
    Korean syllable or an emoji is only partly generated, and after the sequence is replaced."""
    ids = tok.encode("a 안녕 👋🏽 the cat\n똠 " + HOSTILE + " é")
    cache = RecordCache(tok)
    for n in range(1, len(ids) + 1):
        records = cache.update(ids[:n])
        full, text = token_records(tok, ids[:n])
        assert records == full and cache.text == text
    shuffled = ids[:3] + ids[3:][::-1]
    assert cache.update(shuffled) == token_records(tok, shuffled)[0]


def test_token_view_inputs_and_errors(tok):
    ids = tok.encode("the mat")
    assert TokenView(tok, torch.tensor([ids])).ids == ids
    assert TokenView(tok, ids).ids == ids
    view = TokenView(tok, ids[:2])
    view.append_ids(ids[2:])
    assert view.ids == ids and len(view.tokens) == len(ids)
    strings = TokenView(None, ["a b", "\n"])
    assert [r["text"] for r in strings.tokens] == ["a·b", "↵"]
    with pytest.raises(ValueError, match="no tokenizer"):
        TokenView(None, "text")
    with pytest.raises(ValueError, match=r"\[pos\] or \[1, pos\]"):
        TokenView(tok, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        TokenView(tok, torch.zeros(3))


def test_token_view_real_command_r_tokenizer_splits_emoji():
    folder = SHARED / "command-r"
    if not (folder / "tokenizer.json.gz").is_file():
        pytest.skip(f"real Command-R tokenizer not found at {folder} (kept beside the repo, not in it)")
    real = Tokenizer.from_pretrained(folder)
    view = TokenView(real, "안녕하세요 👋 <b>x</b>")
    recs = view.tokens
    assert [r["id"] for r in recs] == real.encode("안녕하세요 👋 <b>x</b>")
    assert "안" in [r["text"] for r in recs]               # whole syllables are single tokens here
    wave = [r for r in recs if r["chars"] in ("👋", " 👋")]
    assert len(wave) >= 2 and all(r["partial"] for r in wave)
    assert b"".join(bytes.fromhex(r["hex"].replace(" ", "")) for r in wave).endswith("👋".encode())


def test_snapshots_escape_token_text(tok):
    html = TokenView(tok, "a " + HOSTILE + " <b>").to_html()
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<script" not in html and "<b>" not in html
    bundle, _ = TokenView(tok, HOSTILE)._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "<img" not in bundle["text/html"]
    assert "&lt;img" in bundle["text/html"]


def test_big_snapshots_do_not_bloat_the_notebook(model, tok):
    view = AttentionView(model, tok, torch.randint(10, 260, (1, 200), generator=torch.Generator().manual_seed(1)))
    bundle, _ = view._repr_mimebundle_()
    assert len(view.to_html()) > 64 * 1024 and len(bundle["text/html"]) < 1000
    assert "view.to_html()" in bundle["text/html"]


def test_static_assets_have_no_network_and_no_innerhtml():
    files = list(STATIC.glob("*.js")) + list(STATIC.glob("*.css"))
    assert {f.name for f in files} >= {"_common.js", "token_view.js", "attention_view.js", "logit_lens_view.js",
                                       "widgets.css"}
    for f in files:
        src = f.read_text(encoding="utf-8")
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", src), f.name
        assert not re.search(r"https?://|import\s.*from", src), f"{f.name} reaches for the network/imports"


# ------------------------------------------------------------------------------------------------ AttentionView
PROMPT = "the cat sat on the mat. the dog ate the cat. " * 2 + "the cat sat"


def test_attention_view_slices_match_the_model(model, tok):
    ids = tok.encode(PROMPT)
    T = len(ids)
    _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=lambda n: n.endswith("hook_pattern"))
    view = AttentionView(model, tok, PROMPT, layer=1, head=2, window=8, thumb_size=6)
    assert view.layers == [0, 1, 2] and view.n_heads == 4 and view.n_tokens == T
    assert [r["id"] for r in view.tokens] == ids
    full = cache["pattern", 1][0, 2]
    assert torch.equal(view.pattern_full(), full.float())
    assert view.pattern_shape == [8, 8]
    assert torch.allclose(decoded(view, "pattern", "pattern_shape"), full[:8, :8], atol=1e-3)
    view.q_start, view.k_start = 10, 3
    assert torch.allclose(decoded(view, "pattern", "pattern_shape"), full[10:18, 3:11], atol=1e-3)
    view.q_start = 10_000                                           # clamped to the last full window
    assert view.q_start == T - 8
    view.layer, view.head = 2, 0                                    # as the browser's selectors would
    assert torch.allclose(view.pattern_slice(), cache["pattern", 2][0, 0, T - 8:, 3:11])
    pooled = F.adaptive_max_pool2d(cache["pattern", 2][0][None].float(), (6, 6))[0]
    assert view.thumb_size == 6
    assert torch.equal(decoded(view, "thumbs", [4, 6, 6], "u8"), (pooled * 255).round().to(torch.uint8))
    view.query = 7
    assert torch.allclose(from_f16(view.query_row, [T]), cache["pattern", 2][0, 0, 7], atol=1e-3)
    # the same view from an existing cache + tokens
    again = AttentionView(cache=cache, tokens=ids, tokenizer=tok, layer=2, head=0)
    assert torch.equal(again.pattern_full(), view.pattern_full())
    assert TokenView(tok, ids).tokens == again.tokens


def test_attention_view_sends_only_the_window_as_binary(model, tok):
    ids = torch.randint(10, 260, (1, 600), generator=torch.Generator().manual_seed(0))
    view = AttentionView(model, tok, ids, window=64, thumb_size=32)
    state, paths, buffers = _remove_buffers(view.get_state())
    assert ["pattern"] in paths and ["thumbs"] in paths            # binary buffers, not JSON
    sizes = {p[0]: len(b) for p, b in zip(paths, buffers)}
    assert sizes["pattern"] == 64 * 64 * 2 and sizes["thumbs"] == 4 * 32 * 32
    assert sum(sizes.values()) < 30_000                             # not 3 × 4 × 600² floats


def test_attention_view_errors(model, tok):
    ids = tok.encode("the cat")
    _, cache = model.run_with_cache(torch.tensor([ids]), names_filter="blocks.0.attn.hook_pattern")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.hook_pattern: expected a pattern of shape"):
        AttentionView(cache=cache, tokens=ids + ids, tokenizer=tok)
    with pytest.raises(ValueError, match="layer=1"):
        AttentionView(cache=cache, tokens=ids, tokenizer=tok, layer=1)
    with pytest.raises(ValueError, match="head=9"):
        AttentionView(cache=cache, tokens=ids, tokenizer=tok, head=9)
    with pytest.raises(ValueError, match="no blocks"):
        AttentionView(cache={}, tokens=ids, tokenizer=tok)
    with pytest.raises(ValueError, match="tokens="):
        AttentionView(cache=cache)
    view = AttentionView(cache=cache, tokens=ids, tokenizer=tok)
    view.layer = 5                                                  # a stale value from the browser is refused
    assert view.layer == 0


def test_attention_snapshot(model, tok):
    view = AttentionView(model, tok, "the dog " + HOSTILE + " the cat sat on the mat", window=6)
    view.query = 2
    html = view.to_html()
    assert "<img" not in html and "&lt;img" in html and "<script" not in html
    assert html.count("<td") == 36 and "wb-attn-text" in html


# ------------------------------------------------------------------------------------------------ LogitLensView
def test_logit_lens_cells_match_the_model(model, tok):
    ids = tok.encode(PROMPT)
    view = LogitLensView(model, tok, PROMPT, top_k=3, target="the", window=10)
    the = tok.encode("the", add_special_tokens=False)[0]
    assert view.target == the and view.target_label == "the"
    lens = logit_lens(model, torch.tensor([ids]), top_k=3, target=the)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0].float()
    assert view.row_labels == lens.labels and len(view.row_labels) == 4
    assert view.positions == list(range(10))
    shape = [4, 10, 3]
    assert torch.equal(decoded(view, "top_ids", shape, "i32"), lens.top_ids[:, 0, :10])
    assert torch.allclose(decoded(view, "top_probs", shape), lens.top_probs[:, 0, :10], atol=1e-3)
    assert torch.allclose(decoded(view, "target_probs", [4, 10]), lens.target_prob[:, 0, :10], atol=1e-3)
    cells = view.cells()
    last = cells[-1]                                               # resid_post of the last layer = the logits
    for c, cell in enumerate(last):
        assert cell["top"][0][0] == int(logits[c].argmax())
        assert abs(cell["top"][0][2] - float(logits[c].softmax(-1).max())) < 1e-5
        assert abs(cell["target_prob"] - float(logits[c].softmax(-1)[the])) < 1e-5
    assert view.id_text[str(cells[0][0]["top"][0][0])] == cells[0][0]["top"][0][1]
    view.pos_start = 5
    assert view.positions == list(range(5, 15))
    view.target_text = "cat sat"                                   # typed in the browser: an error, shown
    assert re.search(r"'cat sat' is \d tokens", view.error) and view.target == the
    view.target_text = ""
    assert view.target == -1 and view.target_probs == b"" and view.error == ""
    html = view.to_html()
    assert "<script" not in html and html.count("<td class='wb-lens-cell'") == 40


def test_logit_lens_errors(model, tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        LogitLensView(model, tok, "the cat", target=10_000)
    with pytest.raises(ValueError, match="tokens"):
        LogitLensView(model, tok, "the cat", target="the dog ate")
    with pytest.raises(ValueError, match="top_k"):
        LogitLensView(model, tok, "the cat", top_k=0)


# ------------------------------------------------------------------------------------------------ GenerationView
def test_generation_view_state_after_run(model, tok):
    view = GenerationView(model, tok, "the cat", max_new_tokens=6, attention_layers=[0, 2], top_k=3, lens_window=50)
    prompt = tok.encode("the cat")
    out = view.run()
    assert torch.equal(out, model.generate(torch.tensor([prompt]), max_new_tokens=6))
    assert no_hooks(model) and view.result is out
    assert len(view.step_times) == out.shape[1] - len(prompt)      # one update per step (prefill included)
    seq = out[0].tolist()
    assert view.tokens.ids == seq and [r["id"] for r in view.tokens.tokens] == seq
    assert view.status.value == "done: 6 new tokens"
    # the processed positions are all but the newest token: compare with one uncached forward
    processed = out[:, :-1]
    _, cache = model.run_with_cache(processed, names_filter=lambda n: n.endswith("hook_pattern"))
    assert view.attention.layers == [0, 2] and view.attention.n_tokens == processed.shape[1]
    for layer in (0, 2):
        for head in range(4):
            assert torch.allclose(view.attention.pattern_full(layer, head), cache["pattern", layer][0, head],
                                  atol=1e-5)
    lens = logit_lens(model, processed, top_k=3)
    assert torch.equal(view.lens._top_ids, lens.top_ids[:, 0])
    assert torch.allclose(view.lens._top_probs, lens.top_probs[:, 0], atol=1e-5)
    assert [r["id"] for r in view.lens.tokens] == processed[0].tolist()
    assert "<script" not in view.to_html()
    again = view.run()                                              # a second run starts from empty views
    assert torch.equal(again, out) and view.tokens.ids == seq
    assert torch.equal(view.lens._top_ids, lens.top_ids[:, 0]) and view.attention.n_tokens == processed.shape[1]


def test_generation_view_windows_follow_the_newest_tokens(model, tok):
    view = GenerationView(model, tok, "the cat sat on the mat", max_new_tokens=12, attention_layers=[1],
                          window=8, lens_window=5)
    view.run()
    n = view.attention.n_tokens
    assert view.attention.pattern_shape == [8, 8] and view.attention.q_start == n - 8
    assert view.lens.positions == list(range(n - 5, n))


def test_generation_view_stop_leaves_no_hooks(model, tok):
    view = GenerationView(model, tok, "the cat", max_new_tokens=40)
    steps = []

    def count(x, hook):                                             # the user's own hook, kept through generate
        if hook.ctx.step is not None:
            steps.append(hook.ctx.step)
            if hook.ctx.step == 3:
                view.stop()

    view.generate_kwargs["fwd_hooks"] = [("hook_embed", count)]
    out = view.run()
    assert out.shape[1] == len(view.prompt_ids) + 4 and max(steps) == 3
    assert view.status.value == "stopped: 4 new tokens"
    assert no_hooks(model)


def test_generation_view_run_async_and_stop_button(model, tok):
    started = threading.Event()

    def slow(x, hook):
        started.set()
        threading.Event().wait(0.02)

    view = GenerationView(model, tok, "the cat", max_new_tokens=500, attention_layers=[0], fwd_hooks=[("hook_embed", slow)])
    thread = view.run_async()
    assert started.wait(30)
    while len(view.step_times) < 2:
        threading.Event().wait(0.01)
    view.stop_button.click()                                        # what the browser's click does
    out = view.wait(timeout=60)
    assert not thread.is_alive() and out.shape[1] < len(view.prompt_ids) + 500
    assert view.status.value.startswith("stopped") and no_hooks(model)


def test_generation_view_errors(model, tok):
    with pytest.raises(ValueError, match="attention_layers"):
        GenerationView(model, tok, "the cat", attention_layers=[7])
    with pytest.raises(ValueError, match="on_step= is set by GenerationView"):
        GenerationView(model, tok, "the cat", on_step=print)
    view = GenerationView(model, tok, "the cat", max_new_tokens=2, temperature=-1.0, do_sample=True)
    with pytest.raises(ValueError):
        view.run()
    assert view.status.value.startswith("error: ValueError") and no_hooks(model)


def test_generation_view_chat_messages(model, tok):
    tok.chat_templates["default"] = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
                                     "{% if add_generation_prompt %}<|END_OF_TURN_TOKEN|>{% endif %}")
    view = GenerationView(model, tok, [{"role": "user", "content": "the cat"}], max_new_tokens=1)
    assert view.prompt_ids == tok.encode("the cat<|END_OF_TURN_TOKEN|>")
