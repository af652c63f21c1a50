"""Long-context attention: blocked patterns, exact rows/spans without the full pattern, bounded memory."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import REPO
from workbench import HookedCommandR
from workbench.attention_ops import mask_rows, pattern_rows
from workbench.analysis import AttentionRecorder, attention_rows, attention_to_spans, spans_from_chat
from workbench.config import CommandRConfig
from workbench.hook_names import act_name
from workbench.kv_cache import KVCache
from workbench.model import repeat_kv

COHERE2 = dict(model_type="cohere2", sliding_window=4,
               layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
CONFIGS = {
    "mha": dict(n_heads=4, n_kv_heads=4, n_layers=2),
    "gqa-qknorm": dict(n_heads=4, n_kv_heads=2, n_layers=2, use_qk_norm=True),
    "cohere2-window": dict(n_heads=4, n_kv_heads=2, n_layers=4, **COHERE2),
}


def _model(name, dtype=torch.float32):
    cfg = CommandRConfig(vocab_size=97, d_model=32, d_mlp=64, eos_token_id=None, **CONFIGS[name])
    model = HookedCommandR.from_config(cfg, dtype=dtype, seed=1)
    model.attn_impl = "explicit"           # every layer explicit: upstream residuals equal the pattern run's
    return model


def _inputs(padded: bool, batch=2, pos=13):
    ids = torch.randint(1, 97, (batch, pos), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :4] = 0
    return ids, (mask if padded else None)


def _patterns(model, ids, mask):
    _, cache = model.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: n.endswith("hook_pattern"))
    return [cache["pattern", i] for i in range(model.cfg.n_layers)]


def _blas_row_blocks_bitwise() -> bool:
    """Does this host's BLAS give a block of >= 8 rows the same bits as the full fp32 matmul?"""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(3, 40, 16, generator=g), torch.randn(3, 16, 40, generator=g)
    return torch.equal(torch.matmul(q[:, 8:16], k), torch.matmul(q, k)[:, 8:16])


@pytest.mark.parametrize("name,padded", [("mha", False), ("gqa-qknorm", True), ("cohere2-window", True)])
def test_rows_and_spans_equal_full_pattern(name, padded):
    model = _model(name)
    ids, mask = _inputs(padded)
    full = _patterns(model, ids, mask)
    heads, queries = [0, 3], [0, 5, 6, -1]
    rows = attention_rows(model, ids, heads=heads, queries=queries, attention_mask=mask)
    assert sorted(rows) == list(range(model.cfg.n_layers))
    for layer, pattern in enumerate(full):
        want = pattern[:, heads][:, :, [0, 5, 6, 12]]
        assert rows[layer].shape == want.shape == (2, 2, 4, 13)
        torch.testing.assert_close(rows[layer], want, rtol=1e-6, atol=0)
        if _blas_row_blocks_bitwise():
            assert torch.equal(rows[layer], want), f"layer {layer}: not bit-identical"
    spans = [(0, 4), ("rest", 4, 13), (2, 3)]
    mass = attention_to_spans(model, ids, spans, queries=[-2, -1], layers=[0, model.cfg.n_layers - 1],
                              attention_mask=mask)
    assert mass.shape == (2, 2, 4, 2, 3) and mass.dtype == torch.float32
    for slot, layer in enumerate([0, model.cfg.n_layers - 1]):
        p = full[layer][:, :, [11, 12]]
        want = torch.stack([p[..., a:b].sum(-1, dtype=torch.float32) for a, b in [(0, 4), (4, 13), (2, 3)]], -1)
        torch.testing.assert_close(mass[slot], want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(mass[..., :2].sum(-1), torch.ones(2, 2, 4, 2), rtol=0, atol=1e-5)


def test_fused_forward_rows_match_explicit():
    model = _model("cohere2-window")
    ids, mask = _inputs(True)
    full = _patterns(model, ids, mask)
    model.attn_impl = "auto"               # every layer fused; only the selected rows are explicit
    rows = attention_rows(model, ids, attention_mask=mask)
    assert torch.equal(rows[0], full[0])   # layer 0's q/k do not depend on the attention path
    for layer in range(1, 4):
        torch.testing.assert_close(rows[layer], full[layer], rtol=1e-5, atol=1e-6)


def test_rows_bf16_bitwise():
    model = _model("gqa-qknorm", torch.bfloat16)
    ids, mask = _inputs(True)
    full = _patterns(model, ids, mask)
    rows = attention_rows(model, ids, queries=[3, -1], attention_mask=mask)
    for layer, pattern in enumerate(full):
        assert torch.equal(rows[layer], pattern[:, :, [3, 12]])


@pytest.mark.parametrize("name", ["gqa-qknorm", "cohere2-window"])
def test_cached_generation_rows(name):
    """Rows of every generated token over the whole cache equal the explicit patterns of the same steps."""
    model = _model(name)
    ids, mask = _inputs(True, pos=9)
    patterns, seen = [], []
    with AttentionRecorder(model, queries=[-1], on_step=lambda i, rows: seen.append((i, sorted(rows)))) as rec:
        model.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0,
                       capture=lambda n: n.endswith("hook_pattern"),
                       on_step=lambda info: patterns.append(dict(info.activations)))
    assert len(rec.steps) == len(patterns) == 6
    assert seen == [(i, list(range(model.cfg.n_layers))) for i in range(6)]    # called once per forward
    for step, (rows, acts) in enumerate(zip(rec.steps, patterns)):
        for layer in range(model.cfg.n_layers):
            got = rows[layer]
            kept = acts[act_name("pattern", layer)][:, :, -1:]     # over the keys the cache kept
            total = 9 + step
            assert got.shape == (2, 4, 1, total)
            assert torch.equal(got[..., total - kept.shape[-1]:], kept), (step, layer)
            assert not got[..., :total - kept.shape[-1]].any()             # dropped by the sliding window


def test_rows_with_kv_cache_decode():
    model = _model("cohere2-window")
    ids, _ = _inputs(False, batch=1, pos=10)
    ref = KVCache.for_model(model)
    model(ids[:, :7], kv_cache=ref)
    cache = ref.clone()
    full = _patterns_cached(model, ids[:, 7:], ref)
    rows = attention_rows(model, ids[:, 7:], queries=[0, 2], kv_cache=cache)
    assert cache.seen == 10                                                 # extended like a forward
    for layer in range(4):
        kept = full[layer][:, :, [0, 2]]
        assert rows[layer].shape == (1, 4, 2, 10)
        torch.testing.assert_close(rows[layer][..., 10 - kept.shape[-1]:], kept, rtol=1e-6, atol=0)


def _patterns_cached(model, ids, cache):
    _, acts = model.run_with_cache(ids, kv_cache=cache, names_filter=lambda n: n.endswith("hook_pattern"))
    return [acts["pattern", i] for i in range(model.cfg.n_layers)]


def test_blocked_pattern_is_bitwise_the_unblocked_one():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(2, 40, 4, 16, generator=g).to(dtype).transpose(1, 2)     # [batch head q_pos d_head]
        k = repeat_kv(torch.randn(2, 45, 2, 16, generator=g).to(dtype).transpose(1, 2), 2)
        pad = torch.ones(2, 45, dtype=torch.bool)
        pad[1, :6] = False
        mask = mask_rows(5, 40, pad, dtype, "cpu", 9, 45)
        want = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * 0.25 + mask, -1, dtype=torch.float32).to(dtype)
        for block in (8, 13, 40):
            got = pattern_rows(q, k, 0.25, lambda a, b: mask[:, :, a:b], block=block)
            assert torch.equal(got, want), (dtype, block)


def test_bad_selection_is_refused():
    model = _model("mha")
    ids, _ = _inputs(False)
    with pytest.raises(ValueError, match="heads"):
        attention_rows(model, ids, heads=[4])
    with pytest.raises(ValueError, match="queries"):
        attention_rows(model, ids, queries=[13])
    with pytest.raises(ValueError, match="spans"):
        attention_to_spans(model, ids, [(3, 20)])


def test_spans_from_chat_bundled_rag():
    from workbench.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained("command-r-tiny")
    docs = [{"title": "Tall penguins", "text": "Emperor penguins are the tallest."},
            {"title": "Penguin habitats", "text": "Emperor penguins only live in Antarctica."}]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What are the tallest penguins?"}]
    ids, spans = spans_from_chat(tok, messages, documents=docs)
    assert ids.shape[0] == 1 and ids[0].tolist() == tok.apply_chat_template(
        messages, documents=docs, chat_template="rag", add_generation_prompt=True)
    by_name = {s.name: s for s in spans}
    assert set(by_name) == {"system", "user 1", "assistant 2", "user 3", "question", "document 0", "document 1"}
    text = lambda s: tok.decode(ids[0, s.start:s.end])                      # noqa: E731
    assert text(by_name["question"]).strip() == "What are the tallest penguins?"
    assert text(by_name["system"]).strip() == "Be brief."
    assert text(by_name["document 1"]).strip() == "Penguin habitats\ntext: Emperor penguins only live in Antarctica."
    assert by_name["document 0"].end <= by_name["document 1"].start
    assert [s.start for s in spans] == sorted(s.start for s in spans)


def test_spans_from_chat_command_r_template(shared_dir):
    from workbench.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(shared_dir / "command-r")
    docs = [{"title": "A", "snippet": "one two"}, {"title": "B", "snippet": "three"}]
    ids, spans = spans_from_chat(tok, [{"role": "user", "content": "Which?"}], documents=docs)
    by_name = {s.name: s for s in spans}
    assert tok.decode(ids[0, by_name["question"].start:by_name["question"].end]) == "Which?"
    assert tok.decode(ids[0, by_name["document 1"].start:by_name["document 1"].end]).strip() == "B\nsnippet: three"


# ---------------------------------------------------------------------- memory, in fresh processes
_CHILD = textwrap.dedent("""
    import json, resource, sys
    import torch
    from workbench import HookedCommandR
    from workbench.analysis import attention_rows
    from workbench.config import CommandRConfig
    from workbench.hook_names import act_name

    mode, n = sys.argv[1], int(sys.argv[2])
    cfg = CommandRConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=2, d_mlp=128)
    model = HookedCommandR.from_config(cfg, seed=0)
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :64])                                   # lazy initialisation outside the measurement

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    try:
        open("/proc/self/clear_refs", "w").write("5")        # reset the peak to the current RSS
    except OSError:
        pass
    before = status("VmRSS")
    kept = []
    with torch.no_grad():
        if mode == "plain":
            model(ids)
        elif mode == "rows":
            kept.append(attention_rows(model, ids, queries=list(range(-16, 0))))
        elif mode == "pattern":
            model.run_with_hooks(ids, fwd_hooks=[(act_name("pattern", 0), lambda x, hook: kept.append(x))])
    peak = status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"increase": peak - before}))
""")


def _peak_increase(mode: str, n: int) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", _CHILD, mode, str(n)], capture_output=True, text=True,
                         env=env, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["increase"]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak RSS read from /proc")
def test_memory_hooked_pattern_and_rows():
    n = 4096
    pattern_bytes = 2 * n * n * 4                            # [1 head=2 q_pos k_pos] float32
    increase = _peak_increase("pattern", n)
    assert increase <= 1.5 * pattern_bytes, f"hooked pattern: {increase / pattern_bytes:.2f}x its bytes"
    n = 12 * 1024
    plain, rows = _peak_increase("plain", n), _peak_increase("rows", n)
    assert rows <= 1.5 * plain, f"16 rows at {n} tokens: {rows / 2**20:.0f} MiB vs plain forward {plain / 2**20:.0f} MiB"


# ---------------------------------------------------------------------- blocked explicit path vs transformers
LONG = {
    "mha-fp32": (dict(num_attention_heads=4, num_key_value_heads=4, use_qk_norm=False), "cohere", torch.float32, False),
    "gqa-bf16-padded": (dict(num_attention_heads=4, num_key_value_heads=2), "cohere", torch.bfloat16, True),
    "cohere2-fp32-padded": (dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=64,
                                 layer_types=["sliding_attention", "full_attention"]), "cohere2", torch.float32, True),
}


@pytest.mark.parametrize("name", list(LONG))
def test_blocked_explicit_pattern_bitwise_vs_transformers(name, tmp_path, monkeypatch):
    """The pattern computed in 8-row query blocks (the smallest the code makes) is the reference's, bit
    for bit (blocking starts above SINGLE_BLOCK_BYTES and blocks are larger; both lowered here so 300
    tokens suffice; the real settings at 1,100 tokens were checked the same way)."""
    from _reference import load_reference, make_hf_checkpoint
    from workbench import attention_ops

    monkeypatch.setattr(attention_ops, "SINGLE_BLOCK_BYTES", 0)
    monkeypatch.setattr(attention_ops, "BLOCK_FRACTION", 1000)
    overrides, model_type, dtype, padded = LONG[name]
    path = make_hf_checkpoint(tmp_path, seed=2, model_type=model_type, num_hidden_layers=2,
                              max_position_embeddings=512, **overrides)
    ref = load_reference(path, dtype)
    ours = HookedCommandR.from_pretrained(path, dtype=dtype)
    batch, n = (2, 300) if padded else (1, 300)
    assert attention_ops.block_size(n, n, batch * 4, dtype) == attention_ops.MIN_BLOCK
    ids = torch.randint(7, 97, (batch, n), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :37] = 0                                  # (cohere2: window 64 < 300 tokens)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = ref(ids, attention_mask=mask, position_ids=pos, output_attentions=True)
        logits, cache = ours.run_with_cache(ids, attention_mask=mask, position_ids=pos,
                                            names_filter=lambda n: n.endswith("hook_pattern"))
    real = mask.bool()
    assert torch.equal(logits[real], out.logits[real])
    for layer in range(2):
        ours_rows = cache["pattern", layer].transpose(1, 2)[real]           # [real query, head, k_pos]
        assert torch.equal(ours_rows, out.attentions[layer].transpose(1, 2)[real]), f"layer {layer}"
