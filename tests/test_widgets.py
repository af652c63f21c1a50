"""Python-level tests of the widgets' state: which tokens, which slice, which cells (no browser).

The browser side (rendering, escaping in the DOM, live updates) is in test_widgets_browser.py.
"""

from __future__ import annotations

import json
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
from workbench.widgets import AttentionView, CompareView, GenerationView, LogitLensView, TokenView, link_selection
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


@pytest.mark.parametrize("n", [31, 1000])
def test_snapshots_fit_64_kib_and_say_when_downsampled(model, tok, n):
    ids = torch.randint(10, 260, (1, n), generator=torch.Generator().manual_seed(1))
    views = {"tokens": TokenView(tok, ids), "attention": AttentionView(model, tok, ids, window=64),
             "lens": LogitLensView(model, tok, ids, top_k=5)}
    views["attention"].query = n - 1                                 # with the coloured text strip too
    for name, view in views.items():
        html = view.to_html(full_page=False)
        assert len(html.encode()) <= 64 * 1024, (name, n, len(html))
        bundle, _ = view._repr_mimebundle_()
        assert bundle["text/html"] == html                           # the real snapshot, not the placeholder
    att = views["attention"].to_html()
    assert "data:image/png;base64," in att and "<td" not in att
    big = views["attention"]
    big.window, big.query = n, -1                                    # the whole pattern in one window
    html = big.to_html()
    assert len(html.encode()) <= 64 * 1024
    assert ("downsampled for the snapshot" in html) == (n > 96)
    if n == 1000:
        assert "snapshot shows" in views["tokens"].to_html()          # the strip says what it left out


def test_snapshot_png_is_the_pattern(model, tok):
    """The snapshot image decodes to the colours of the window's values (no PIL: inflate the PNG by hand)."""
    import base64
    import re as re_
    import zlib

    from workbench.widgets.snapshot import colour_rgb

    view = AttentionView(model, tok, PROMPT, window=8)
    uri = re_.search(r"src='data:image/png;base64,([^']+)'", view.to_html()).group(1)
    png = base64.b64decode(uri)
    w, h = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    idat = png[png.index(b"IDAT") + 4: png.index(b"IEND") - 8]
    raw = zlib.decompress(idat)
    rows = [raw[i * (3 * w + 1) + 1: (i + 1) * (3 * w + 1)] for i in range(h)]
    got = torch.tensor([list(r) for r in rows], dtype=torch.uint8).reshape(h, w, 3)
    assert (w, h) == (8, 8) and torch.equal(got, colour_rgb(view.pattern_slice()))


def test_static_assets_have_no_network_and_no_innerhtml():
    files = list(STATIC.glob("*.js")) + list(STATIC.glob("*.css"))
    assert {f.name for f in files} >= {"_common.js", "token_view.js", "attention_view.js", "logit_lens_view.js",
                                       "widgets.css"}
    css = (STATIC / "widgets.css").read_text()
    without_fallbacks = re.sub(r"var\([^()]*\)", "", css)
    assert not re.search(r"#[0-9a-fA-F]{3,6}\b", without_fallbacks), "a colour outside the theme's variables"
    for var in ("--jp-ui-font-color0", "--jp-layout-color0", "--jp-border-color1"):
        assert f"var({var}, #" in css                                 # theme variables with light fallbacks
    for f in files:
        src = f.read_text(encoding="utf-8")
        assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", src), f.name
        src = src.replace('"http://www.w3.org/2000/svg"', "")        # the SVG namespace name, never fetched
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
    assert view.overview_layers == [0, 1, 2]                        # every layer's heads: the overview grid
    assert torch.equal(decoded(view, "thumbs", [3, 4, 6, 6], "u8")[2], (pooled * 255).round().to(torch.uint8))
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
    assert sizes["pattern"] == 64 * 64 * 2 and sizes["thumbs"] == 3 * 4 * 32 * 32
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
    with pytest.raises(ValueError, match="scale="):
        AttentionView(cache=cache, tokens=ids, tokenizer=tok, scale="sqrt")
    with pytest.raises(ValueError, match=r"spans: 'd' has range \[2, 9\)"):
        AttentionView(cache=cache, tokens=ids, tokenizer=tok, spans=[("d", 2, 9)])
    view = AttentionView(cache=cache, tokens=ids, tokenizer=tok)
    view.layer = 5                                                  # a stale value from the browser is refused
    assert view.layer == 0


def test_attention_snapshot(model, tok):
    view = AttentionView(model, tok, "the dog " + HOSTILE + " the cat sat on the mat", window=6)
    view.query = 2
    html = view.to_html()
    assert "<img src=x" not in html and "&lt;img" in html and "<script" not in html
    assert html.count("<img class='wb-snap-heat'") == 1 and "wb-attn-text" in html and "wb-legend" in html


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
    target_probs = torch.frombuffer(bytearray(view.target_probs), dtype=torch.float32).reshape(4, 10)
    assert torch.equal(target_probs, lens.target_prob[:, 0, :10])
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
    assert torch.equal(view.lens.results()['top_ids'], lens.top_ids[:, 0])
    assert torch.allclose(view.lens.results()['top_probs'], lens.top_probs[:, 0], atol=1e-5)
    assert [r["id"] for r in view.lens.tokens] == processed[0].tolist()
    assert "<script" not in view.to_html()
    again = view.run()                                              # a second run starts from empty views
    assert torch.equal(again, out) and view.tokens.ids == seq
    assert torch.equal(view.lens.results()['top_ids'], lens.top_ids[:, 0]) and view.attention.n_tokens == processed.shape[1]


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


# ------------------------------------------------------------------------------------------------ new behaviour
def test_lens_target_mode_rank_and_space_prefixed_offer(model, tok):
    ids = tok.encode(PROMPT)
    the = tok.encode(" the", add_special_tokens=False)
    assert len(the) == 1
    view = LogitLensView(model, tok, PROMPT, top_k=3, target="the", window=8)
    offer = json.loads(view.target_alt_json)                       # "the" typed: " the" offered, with its id
    assert offer["id"] == the[0] and offer["text"] == " the" and view.target != the[0]
    view.target_text = str(offer["id"])                            # what the offer button sends
    assert view.target == the[0] and view.error == ""
    lens = logit_lens(model, torch.tensor([ids]), top_k=3, target=the[0])
    res = view.results()
    assert torch.equal(res["target_rank"], lens.target_rank[:, 0])
    assert torch.allclose(res["target_prob"], lens.target_prob[:, 0])
    rows, cols = len(view.row_labels), len(view.positions)
    assert torch.equal(decoded(view, "target_ranks", [rows, cols], "i32"), lens.target_rank[:, 0, :cols])
    tp = torch.frombuffer(bytearray(view.target_probs), dtype=torch.float32).reshape(rows, cols)
    assert torch.equal(tp, lens.target_prob[:, 0, :cols].float())   # float32: tiny probabilities survive
    cell = view.cells()[0][0]
    assert cell["target_rank"] == int(lens.target_rank[0, 0, 0])
    html = view.to_html()
    assert f"#{cell['target_rank'] + 1}" in html and f"id {the[0]}" in html
    view.target_text = "cat sat"
    assert "tokens" in view.error
    view.set_scale("log")
    assert view.scale == "log"
    with pytest.raises(ValueError, match="scale="):
        view.set_scale("sqrt")


def test_batched_lens_equals_one_residual_at_a_time(model, tok):
    from workbench.analysis import lens_logits, lens_resid_names, lens_top

    ids = torch.tensor([tok.encode(PROMPT)])
    _, cache = model.run_with_cache(ids, names_filter=lens_resid_names(model.cfg.n_layers))
    stack = torch.stack([cache[n][0] for n in lens_resid_names(model.cfg.n_layers)])     # [n_resid pos d_model]
    top_ids, top_probs, p, rank = lens_top(model, stack, 4, target=7)
    for r in range(stack.shape[0]):
        logits = lens_logits(model, stack[r]).float()
        probs = logits.softmax(-1)
        assert torch.equal(top_ids[r], probs.topk(4, -1).indices)
        assert torch.allclose(p[r], probs[:, 7], atol=1e-7)
        assert torch.equal(rank[r], (logits > logits[:, 7:8]).sum(-1))


def test_head_scores_outside_mass_and_profile(model, tok):
    ids = tok.encode(PROMPT)
    view = AttentionView(model, tok, PROMPT, window=8, score_by="induction")
    scores = view.head_scores()
    T = len(ids)
    for layer in view.layers:
        full = view.pattern_full(layer, 0)
        prev = torch.stack([full[q, q - 1] for q in range(1, T)]).mean()
        assert abs(scores["previous-token"][layer, 0] - prev) < 1e-6
        assert abs(scores["BOS"][layer, 0] - full[:, 0].mean()) < 1e-6
    # induction: query q attends to the token after the previous occurrence of its own token
    occurrences = [max((j for j in range(q) if ids[j] == ids[q]), default=-1) for q in range(T)]
    pairs = [(q, j + 1) for q, j in enumerate(occurrences) if j >= 0 and j + 1 < q]
    full = view.pattern_full(view.layers[-1], 3)
    assert abs(scores["induction"][-1, 3] - torch.stack([full[q, k] for q, k in pairs]).mean()) < 1e-6
    view.q_start, view.k_start = 12, 4
    out = from_f16(view.outside, [8, 2])
    rows = view.pattern_full()[12:20]
    assert torch.allclose(out[:, 0], rows[:, :4].sum(-1), atol=2e-3)
    assert torch.allclose(out[:, 1], rows[:, 12:].sum(-1), atol=2e-3)
    view.query = T - 1                                              # selecting pans the window to the query
    assert view.q_start <= T - 1 < view.q_start + 8
    assert torch.allclose(from_f16(view.minimap, [T]), view.pattern_full()[T - 1], atol=2e-3)
    given = AttentionView(model, tok, PROMPT, profile=torch.arange(T, dtype=torch.float32),
                          head_scores={"mine": torch.ones(3, 4)})
    assert torch.allclose(from_f16(given.minimap, [T]), torch.arange(T) / (T - 1), atol=2e-3)
    assert torch.equal(given.head_scores()["mine"], torch.ones(3, 4))


def test_overview_is_windowed_over_layers(model, tok):
    view = AttentionView(model, tok, PROMPT, thumb_size=5)
    view.overview_rows = 2
    assert view.overview_layers == [0, 1] and len(view.thumbs) == 2 * 4 * 25
    view.layer = 2                                                   # the overview follows the selected layer
    assert view.overview_layers == [1, 2]


def test_linked_selection(model, tok):
    ids = tok.encode(PROMPT)
    tv, av, lv = TokenView(tok, ids), AttentionView(model, tok, ids, window=8), LogitLensView(model, tok, ids, window=6)
    link_selection(tv, av, lv)
    tv.selected = 20                                                 # a chip click in the browser
    assert av.query == 20 and lv.selected == 20
    assert av.q_start <= 20 < av.q_start + 8 and lv.pos_start <= 20 < lv.pos_start + 6
    av.query = 3
    assert tv.selected == 3 and lv.selected == 3
    with pytest.raises(TypeError, match="no selected position"):
        link_selection(tv, object())


def test_compare_view_difference(model, tok):
    clean, corrupt = "the cat sat on the mat", "the dog sat on the mat"
    view = CompareView(model, tok, clean, corrupt, layer=1, head=2)
    _, c1 = model.run_with_cache(torch.tensor([tok.encode(clean)]), names_filter=lambda n: n.endswith("pattern"))
    _, c2 = model.run_with_cache(torch.tensor([tok.encode(corrupt)]), names_filter=lambda n: n.endswith("pattern"))
    assert view.diff.signed and torch.allclose(view.diff.pattern_full(1, 2), (c2["pattern", 1] - c1["pattern", 1])[0, 2])
    view.clean.layer, view.clean.head = 2, 0                          # the three move together
    assert (view.corrupted.layer, view.diff.head) == (2, 0)
    assert len(view.to_html()) <= 3 * 64 * 1024
    uneven = CompareView(model, tok, clean, "the dog")
    assert uneven.diff is None and "tokens" in uneven.note.value


def test_generation_frames_send_only_new_tokens(model, tok):
    view = GenerationView(model, tok, "the cat", max_new_tokens=30, attention_layers=[0], frame_interval=0.0,
                          eos_token_id=[])
    sent = []
    view.tokens.observe(lambda ch: sent.append(len(json.loads(ch["new"]))), names="tail_json")
    view.run()
    assert sent and max(sent) <= view.tokens.TAIL_MAX                 # the tail, never the whole list again
    assert view.tokens.tokens == token_records(tok, view.result[0].tolist())[0]
    merged = GenerationView(model, tok, "the cat", max_new_tokens=30, attention_layers=[0], frame_interval=60.0,
                            eos_token_id=[])
    merged.run()
    assert len(merged.frame_times) <= 2 and len(merged.step_times) == 30          # frames merged, final one sent
    assert merged.tokens.ids == merged.result[0].tolist() and merged.outcome == "done"
    assert len(merged.timeline) == 30 and merged.timeline[-1][1] == merged.result.shape[1]


def test_stop_outside_a_run_changes_nothing(model, tok):
    view = GenerationView(model, tok, "the cat", max_new_tokens=3)
    view.run()
    view.stop()                                                      # a late click after the run ended
    assert not view.stop_event.is_set() and view.status.value == "done: 3 new tokens"


def test_zero_width_characters_are_visible(tok):
    from workbench.widgets._base import visible

    assert visible("a\u200db\u200b") == "a⟨ZWJ⟩b⟨ZWSP⟩"
    html = TokenView(tok, "x\u200dy").to_html()
    assert "⟨ZWJ⟩" in html


def test_stop_is_visibly_disabled_where_clicks_cannot_reach_run(model, tok):
    """Outside a kernel with a shell-channel thread (here: no kernel at all) a click cannot reach run(): the
    button is disabled while it runs, with a one-line reason, and enabled for run_async."""
    seen = []

    def look(x, hook):
        if hook.ctx.step == 1:
            seen.append((view.stop_button.disabled, view.stop_note.value))

    view = GenerationView(model, tok, "the cat", max_new_tokens=3, fwd_hooks=[("hook_embed", look)])
    view.run()
    assert seen and seen[0][0] and "run_async" in seen[0][1]
    assert view.stop_note.value == "" and view.stop_button.disabled
    seen.clear()
    view.run_async()
    view.wait(60)
    assert seen and not seen[0][0] and seen[0][1] == ""
