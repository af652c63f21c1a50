"""generate(): token-identical to transformers' greedy generate; hooks, steering and per-step capture
during cached decoding; stop flag / KeyboardInterrupt; streaming text; generate_text."""

import io
import pathlib
import threading

import pytest
import torch

from _reference import load_reference, make_hf_checkpoint
from workbench import HookedCommandR
from workbench.generation import GenerationInterrupted, StepInfo, TextStreamer, generate_text
from workbench.kv_cache import KVCache

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"
CHECKPOINTS = {
    "qknorm-gqa": dict(),                                             # 4 heads, 2 kv heads, qk-norm
    "no-qknorm-mha": dict(use_qk_norm=False, num_key_value_heads=4),
    "cohere2-window": dict(model_type="cohere2", num_hidden_layers=4, sliding_window=5, sliding_window_pattern=2,
                           logit_scale=0.25, num_key_value_heads=1),
}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = {}
    for name, over in CHECKPOINTS.items():
        over = dict(over)
        path = make_hf_checkpoint(tmp_path_factory.mktemp(name), seed=len(out) + 1,
                                  model_type=over.pop("model_type", "cohere"), **over)
        ours = HookedCommandR.from_pretrained(path)
        ours.attn_impl = "explicit"                 # the reference's eager attention, bit for bit
        out[name] = (ours, load_reference(path))
    return out


def _prompts(batch=3, lengths=(9, 4, 6), vocab=97, seed=0):
    """Left-padded prompts of different lengths (pad id 0 never appears in real tokens)."""
    gen = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(batch, n, dtype=torch.long)
    mask = torch.zeros(batch, n, dtype=torch.long)
    for i, length in enumerate(lengths[:batch]):
        ids[i, n - length:] = torch.randint(7, vocab, (length,), generator=gen)
        mask[i, n - length:] = 1
    return ids, mask


def _hf_generate(ref, ids, mask=None, **kw):
    with torch.no_grad():
        return ref.generate(ids, attention_mask=mask, do_sample=False, return_dict_in_generate=True,
                            output_logits=True, **kw)


# ---------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("batch", [1, 3], ids=["batch1", "padded3"])
def test_greedy_token_identical_to_transformers(pairs, name, batch):
    ours, ref = pairs[name]
    ids, mask = _prompts()
    ids, mask = (ids[:1, -9:], None) if batch == 1 else (ids, mask)
    new = 24                                     # cohere2: window 5 < generated length
    theirs = _hf_generate(ref, ids, mask, max_new_tokens=new, eos_token_id=None)
    logits = []
    mine = ours.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[],
                         capture="hook_logits", on_step=lambda i: logits.append(i.activations["hook_logits"][:, -1]))
    assert torch.equal(mine, theirs.sequences)
    assert mine.shape == (ids.shape[0], ids.shape[1] + new)
    assert len(set(mine[0, ids.shape[1]:].tolist())) > 2, "degenerate generation"
    # decode steps are bit-identical to transformers' cached eager steps
    for step in range(1, new):
        assert torch.equal(logits[step], theirs.logits[step]), step
    # the prefill equals the reference forward at the last prompt position (transformers' generate
    # computes only that row of the unembedding, which can round differently)
    with torch.no_grad():
        pos = None if mask is None else (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        full = ref(ids, attention_mask=mask, position_ids=pos).logits[:, -1]
    assert torch.equal(logits[0], full)


def test_sliding_cache_never_exceeds_window_during_generate(pairs):
    ours, ref = pairs["cohere2-window"]
    cfg = ours.cfg
    W = cfg.sliding_window
    sliding = [i for i in range(cfg.n_layers) if cfg.layer_window(i) is not None]
    assert sliding and len(sliding) < cfg.n_layers
    ids, mask = _prompts(lengths=(8, 3, 5))
    cache = KVCache.for_model(ours)
    lengths = []
    ours.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[], kv_cache=cache,
                  on_step=lambda i: lengths.append([cache.length(j) for j in range(cfg.n_layers)]))
    for step, row in enumerate(lengths):
        for j in range(cfg.n_layers):
            seen = ids.shape[1] + step
            assert row[j] == (min(seen, W - 1) if j in sliding else seen)
    assert max(cache.capacity(j) for j in sliding) <= 2 * (W - 1)


def test_eos_stops_each_sequence_and_pads(pairs):
    ours, ref = pairs["qknorm-gqa"]
    ids, mask = _prompts()
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=[])
    n = ids.shape[1]
    eos = int(free[0, n + 3])                     # a token the model emits (row 0, 4th new token)
    theirs = _hf_generate(ref, ids, mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0).sequences
    mine = ours.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(mine, theirs)
    row = mine[0, n:].tolist()
    first = row.index(eos)
    assert first <= 3 and all(t == 0 for t in row[first + 1:])
    # all rows finishing ends generation early; eos given as a list works too
    both = ours.generate(ids[:1], max_new_tokens=16, eos_token_id=[eos, 12345])
    assert both.shape[1] == n + first + 1 and both[0, -1] == eos


# ---------------------------------------------------------------------- hooks during generation
def test_hooks_see_step_and_positions(pairs):
    ours, _ = pairs["qknorm-gqa"]
    ids, mask = _prompts()
    seen = []

    def record(x, hook):
        seen.append((hook.ctx.step, hook.ctx.past_len, hook.ctx.positions.clone(), x.shape[1]))

    outer = []
    with ours.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda x, hook: outer.append(hook.ctx.step))]):
        ours.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[],
                      fwd_hooks=[("blocks.0.hook_resid_pre", record)])
    assert [s[0] for s in seen] == [0, 1, 2, 3] == outer
    n = ids.shape[1]
    assert [s[1] for s in seen] == [0, n, n + 1, n + 2]
    assert [s[3] for s in seen] == [n, 1, 1, 1]
    real = mask.sum(-1)
    assert torch.equal(seen[0][2][:, -1], real - 1)
    for step in (1, 2, 3):                        # left padding: positions continue from each row's count
        assert torch.equal(seen[step][2][:, 0], real - 1 + step)
    assert ours.hook_ctx.step is None
    assert not any(hp.has_hooks for hp in ours.hook_dict.values())


def _steer_vector(model):
    return torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(9)) * 3.0


def test_steering_new_positions_matches_uncached_recomputation(pairs):
    ours, _ = pairs["qknorm-gqa"]
    ids = _prompts()[0][:1, -9:]
    n = ids.shape[1]
    vec = _steer_vector(ours)

    def cached_steer(x, hook):                    # acts on generated positions only
        if hook.ctx.step is not None and hook.ctx.step >= 1:
            return x + vec

    steered = ours.generate(ids, max_new_tokens=10, eos_token_id=[], fwd_hooks=[("blocks.1.hook_resid_post", cached_steer)])

    def uncached_steer(x, hook):                  # the same edit on a full recomputation
        new = (hook.ctx.positions >= n).to(x.dtype)[..., None]
        return x + new * vec

    seq = ids
    with torch.no_grad():
        for _ in range(10):
            logits = ours.run_with_hooks(seq, fwd_hooks=[("blocks.1.hook_resid_post", uncached_steer)])
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(steered, seq)
    plain = ours.generate(ids, max_new_tokens=10, eos_token_id=[])
    assert not torch.equal(plain, steered), "the steering vector must change the generation"


CAPTURE = ["hook_embed", "blocks.0.hook_resid_post", "blocks.2.hook_resid_post", "blocks.1.attn.hook_pattern",
           "blocks.1.attn.hook_attn_scores", "blocks.0.attn.hook_rot_k", "blocks.2.ln1.hook_scale",
           "blocks.1.mlp.hook_post", "ln_final.hook_normalized", "hook_logits"]


@pytest.mark.parametrize("name", ["qknorm-gqa", "cohere2-window"])
def test_per_step_capture_equals_uncached_run_with_cache(pairs, name):
    """Explicit attention on both sides. Prefill: bitwise. Decode steps: the cached forward runs
    1-row matmuls where the uncached one runs n-row ones -> equal to float rounding (1e-5)."""
    ours, _ = pairs[name]
    names = [c for c in CAPTURE if c in ours.hook_dict]
    ids, mask = _prompts(lengths=(7, 4, 6))
    infos: list[StepInfo] = []
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], capture=names,
                        on_step=infos.append)
    n, T = ids.shape[1], out.shape[1]
    full_mask = torch.cat([mask, torch.ones(3, T - n, dtype=mask.dtype)], 1)
    pos = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 0)
    _, ref = ours.run_with_cache(out[:, :-1], attention_mask=full_mask[:, :-1], position_ids=pos[:, :-1],
                                 names_filter=names)
    _, ref0 = ours.run_with_cache(ids, attention_mask=mask, position_ids=pos[:, :n], names_filter=names)
    real = mask.bool()
    assert [i.step for i in infos] == list(range(12))
    for key in names:                                    # the prefill: same forward as the prompt's
        got, want = infos[0].activations[key], ref0[key]
        assert got.shape == want.shape, key
        if key.endswith(("hook_pattern", "hook_attn_scores")):
            assert torch.equal(got[real[:, None, :].expand(-1, got.shape[1], -1)],
                               want[real[:, None, :].expand(-1, got.shape[1], -1)]), key
        else:
            assert torch.equal(got[real], want[real]), key
    W = ours.cfg.sliding_window
    for info in infos[1:]:
        p = n + info.step - 1                    # the one position processed this step
        assert torch.equal(info.positions, pos[:, p:p + 1])
        for key in names:
            got = info.activations[key]
            if key.endswith(("hook_pattern", "hook_attn_scores")):
                layer = int(key.split(".")[1])
                lo = 0 if ours.cfg.layer_window(layer) is None else max(0, p + 1 - W)
                assert got.shape[2] == 1 and got.shape[3] == p + 1 - lo, key
                want = ref[key][:, :, p:p + 1, lo:p + 1]
                if key.endswith("hook_attn_scores"):     # masked entries: both finfo.min
                    got, want = got.clamp(min=-1e30), want.clamp(min=-1e30)
            else:
                assert got.shape[1] == 1, key            # bounded: the new position only
                want = ref[key][:, p:p + 1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=key)
    for info in infos:                                   # StepInfo is consistent
        assert torch.equal(info.top_ids[:, 0], info.new_tokens)
        assert info.top_ids.shape == info.top_probs.shape == (3, 10)
        assert torch.all(info.top_probs[:, :-1] >= info.top_probs[:, 1:])
        assert info.sequences.shape[1] == n + info.step + 1 and not info.finished.any()


# ---------------------------------------------------------------------- stopping and interrupts
def _no_hooks(model):
    return not any(hp.has_hooks for hp in model.hook_dict.values()) and model.hook_ctx.step is None


@pytest.mark.parametrize("kind", ["event", "callable"])
def test_stop_flag_returns_tokens_so_far(pairs, kind):
    ours, _ = pairs["qknorm-gqa"]
    ids = _prompts()[0][:1]
    event = threading.Event()
    stop = event if kind == "event" else event.is_set

    def on_step(info):
        if info.step == 3:
            event.set()

    out = ours.generate(ids, max_new_tokens=20, eos_token_id=[], stop=stop, on_step=on_step,
                        fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: None)],
                        capture=["blocks.1.hook_resid_post"])
    full = ours.generate(ids, max_new_tokens=20, eos_token_id=[])
    assert out.shape[1] == ids.shape[1] + 4 and torch.equal(out, full[:, :out.shape[1]])
    assert _no_hooks(ours)


def test_keyboard_interrupt_ends_cleanly(pairs):
    ours, _ = pairs["qknorm-gqa"]
    ids = _prompts()[0][:1]
    full = ours.generate(ids, max_new_tokens=12, eos_token_id=[])

    def on_step(info):
        if info.step == 2:
            raise KeyboardInterrupt

    with pytest.raises(GenerationInterrupted) as info:      # the interrupt reaches the caller, with the tokens
        ours.generate(ids, max_new_tokens=12, eos_token_id=[], on_step=on_step, capture=["hook_logits"],
                      fwd_hooks=[("hook_embed", lambda x, hook: None)])
    out = info.value.tokens
    assert torch.equal(out, full[:, :ids.shape[1] + 3]) and _no_hooks(ours)

    # interrupted in the middle of a decode forward: the cache rolls back and can continue
    cache = KVCache.for_model(ours)

    def boom(x, hook):
        if hook.ctx.step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as info:
        ours.generate(ids, max_new_tokens=12, eos_token_id=[], kv_cache=cache,
                      fwd_hooks=[("blocks.2.hook_resid_pre", boom)])
    out = info.value.tokens
    assert torch.equal(out, full[:, :ids.shape[1] + 5]) and _no_hooks(ours)
    assert cache.seen == out.shape[1] - 1
    rest = ours.generate(out, max_new_tokens=12 - 5, eos_token_id=[], kv_cache=cache)
    assert torch.equal(rest, full)


def test_cache_prefix_clone_gives_several_continuations(pairs):
    ours, _ = pairs["qknorm-gqa"]
    ids = _prompts()[0][:1]
    cache = KVCache.for_model(ours)
    with torch.no_grad():
        ours(ids[:, :-1], kv_cache=cache)                  # shared prefix, computed once
    vec = _steer_vector(ours)
    clean = ours.generate(ids, max_new_tokens=8, eos_token_id=[], kv_cache=cache.clone())
    patched = ours.generate(ids, max_new_tokens=8, eos_token_id=[], kv_cache=cache.clone(),
                            fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x + vec)])
    assert torch.equal(clean, ours.generate(ids, max_new_tokens=8, eos_token_id=[]))
    assert not torch.equal(clean, patched) and cache.seen == ids.shape[1] - 1


def test_bad_arguments_are_refused(pairs):
    ours, _ = pairs["qknorm-gqa"]
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        ours.generate(ids, attention_mask=mask[:, 1:])
    with pytest.raises(ValueError, match="left padding"):
        ours.generate(ids, attention_mask=mask.flip(1))
    with pytest.raises(ValueError, match="on_step"):
        ours.generate(ids, capture=["hook_embed"])
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 97\)"):
        ours.generate(ids + 200)
    with pytest.raises(ValueError, match="max_new_tokens"):
        ours.generate(ids, max_new_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        ours.generate(ids, do_sample=True, temperature=0.0)
    assert _no_hooks(ours)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=0), ids)


# ---------------------------------------------------------------------- text
def _byte_tokenizer():
    """A byte-level BPE with no merges: every UTF-8 byte is its own token, so multi-byte characters
    are split across tokens; wrapped in workbench's Tokenizer when it is available."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    try:
        from workbench.tokenizer import Tokenizer

        return Tokenizer(backend)
    except Exception:  # noqa: BLE001 - fall back to the bare backend, which has the same decode
        return backend


def _stream(tok, ids, **kw):
    buf = io.StringIO()
    pieces = []
    streamer = TextStreamer(tok, file=buf, **kw)
    streamer.on_finalized_text = lambda text, stream_end=False: (pieces.append(text), buf.write(text))
    streamer.put(torch.tensor([ids[:1]]))                  # the prompt (skipped)
    for i in ids[1:]:
        streamer.put(torch.tensor([i]))
    streamer.end()
    return buf.getvalue(), pieces


def test_text_streamer_multibyte_characters():
    tok = _byte_tokenizer()
    text = "Grüße, 世界! naïve 🙂 café\nline two ∑"
    ids = tok.encode(text) if not hasattr(tok, "encode_batch") else tok.encode(text).ids
    assert len(ids) == len(text.encode("utf-8")), "every byte its own token"
    printed, pieces = _stream(tok, [0] + list(ids))
    assert printed == text
    assert all("\ufffd" not in p for p in pieces), pieces
    assert len([p for p in pieces if p]) > 10, "text is printed as it grows, not at the end"


def test_text_streamer_real_tokenizer():
    folder = SHARED / "command-r"
    if not (folder / "tokenizer.json.gz").is_file():
        pytest.skip(f"real tokenizer not found at {folder}")
    from workbench.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(folder)
    text = "Schöne Grüße 🙂🙃 — 東京タワー ok"
    ids = tok.encode(text, add_special_tokens=False)
    assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids))), "some character spans tokens"
    printed, pieces = _stream(tok, [5] + ids)
    assert printed == text and all("\ufffd" not in p for p in pieces)


def test_streamer_in_generate_and_generate_text(pairs):
    ours, _ = pairs["qknorm-gqa"]
    tok = _byte_tokenizer()
    if hasattr(tok, "encode_batch"):
        pytest.skip("workbench.tokenizer.Tokenizer not available")
    ids = _prompts()[0][:1]
    buf = io.StringIO()
    out = ours.generate(ids, max_new_tokens=6, eos_token_id=[], streamer=TextStreamer(tok, file=buf))
    assert buf.getvalue() == tok.decode(out[0, ids.shape[1]:].tolist()) + "\n"
    with pytest.raises(ValueError, match="batch size 1"):
        ours.generate(_prompts()[0], max_new_tokens=2, streamer=TextStreamer(tok, file=buf))
    prompt = "".join(chr(c) for c in range(65, 70))
    reply = generate_text(ours, tok, prompt, max_new_tokens=5, eos_token_id=[])
    want = ours.generate(torch.tensor([tok.encode(prompt)]), max_new_tokens=5, eos_token_id=[])
    assert reply == tok.decode(want[0, len(tok.encode(prompt)):].tolist())
