"""KVCache: cached forwards equal the uncached forward, clones are independent, sliding layers stay
bounded, growth/compaction keeps contents, interrupted forwards roll back, autograd works."""

import pytest
import torch

from workbench import CommandRConfig, HookedCommandR
from workbench.kv_cache import KVCache, KVCacheError

# Cached decoding runs 1-row matmuls where the uncached forward runs n-row ones, so the two agree to
# float rounding, not bitwise (transformers' own cached vs full forward differ by ~1.6e-7 in fp32). Tolerance: 1e-5.
TOL = dict(atol=1e-5, rtol=1e-5)


def _model(model_type="cohere", seed=0, **over):
    base = dict(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=48,
                model_type=model_type, use_qk_norm=model_type == "cohere", logit_scale=0.25)
    if model_type == "cohere2":
        base.update(sliding_window=4, layer_types=["sliding_attention", "sliding_attention", "full_attention"])
    base.update(over)
    cfg = CommandRConfig(**base)
    model = HookedCommandR.from_config(cfg, seed=seed)
    with torch.no_grad():            # larger weights than the 0.02 init: attention that is not uniform
        for name, p in model.named_parameters():
            p.mul_(4.0) if "norm" not in name and "ln" not in name else p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _ids(batch, pos, vocab=61, seed=0):
    return torch.randint(1, vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _chunked(model, ids, chunks, cache=None, **kw):
    cache = cache or KVCache.for_model(model)
    outs, start = [], 0
    for n in chunks:
        outs.append(model(ids[:, start:start + n], kv_cache=cache, **kw))
        start += n
    return torch.cat(outs, dim=1), cache


@pytest.mark.parametrize("model_type", ["cohere", "cohere2"])
@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_cached_equals_uncached(model_type, impl):
    model = _model(model_type)
    model.attn_impl = impl
    ids = _ids(2, 13)
    with torch.no_grad():
        full = model(ids)
        cached, cache = _chunked(model, ids, [5, 1, 3, 1, 1, 1, 1])
    assert cache.seen == 13 and len(cache) == 13
    torch.testing.assert_close(cached, full, **TOL)
    assert not torch.equal(full[:, 5:], full[:, :8]), "degenerate model"
    # the prefill chunk is the same computation as the uncached forward: bitwise
    with torch.no_grad():
        assert torch.equal(model(ids[:, :5], kv_cache=KVCache.for_model(model)), model(ids[:, :5]))


def test_cached_equals_uncached_left_padded():
    model = _model()
    model.attn_impl = "explicit"
    ids = _ids(2, 9)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos)
        cache = KVCache.for_model(model)
        first = model(ids[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6], kv_cache=cache)
        rest = [model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], position_ids=pos[:, i:i + 1], kv_cache=cache)
                for i in range(6, 9)]
    got = torch.cat([first] + rest, dim=1)
    real = mask.bool()
    torch.testing.assert_close(got[real], full[real], **TOL)


def test_growth_and_compaction_keep_contents():
    """A tiny chunk forces many reallocations (global layers) and compactions (sliding layers)."""
    model = _model("cohere2")
    ids = _ids(1, 30)
    with torch.no_grad():
        big, c1 = _chunked(model, ids, [3] + [1] * 27, KVCache.for_model(model, chunk=256))
        small, c2 = _chunked(model, ids, [3] + [1] * 27, KVCache.for_model(model, chunk=1))
    assert torch.equal(big, small)
    for i in range(3):
        assert torch.equal(c1.keys[i], c2.keys[i]) and torch.equal(c1.values[i], c2.values[i])


def test_sliding_layers_keep_last_window_minus_one():
    model = _model("cohere2")
    W = model.cfg.sliding_window
    ids = _ids(2, 25)
    rot_k = {}
    cache = KVCache.for_model(model)
    with torch.no_grad():
        model(ids[:, :7], kv_cache=cache)                 # prefill longer than the window
        for i in range(7, 25):
            model(ids[:, i:i + 1], kv_cache=cache)
            for layer in range(3):
                n = cache.length(layer)
                assert n == (min(i + 1, W - 1) if layer < 2 else i + 1)
                if layer < 2:
                    assert cache.keys[layer].shape[2] <= W - 1
                    assert cache.capacity(layer) <= 2 * (W - 1)   # memory bounded however long we go
        _, rec = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_rot_k") or n.endswith("hook_v"))
    for layer in range(2):                               # what is kept: the last W-1 rotated keys / values
        want_k = rec[f"blocks.{layer}.attn.hook_rot_k"][:, -(W - 1):].transpose(1, 2)
        want_v = rec[f"blocks.{layer}.attn.hook_v"][:, -(W - 1):].transpose(1, 2)
        torch.testing.assert_close(cache.keys[layer], want_k, **TOL)
        torch.testing.assert_close(cache.values[layer], want_v, **TOL)
    assert cache.keys[2].shape[2] == 25


def test_clone_gives_independent_continuations():
    model = _model()
    prompt, a, b = _ids(1, 6), _ids(1, 3, seed=1), _ids(1, 3, seed=2)
    with torch.no_grad():
        cache = KVCache.for_model(model)
        model(prompt, kv_cache=cache)
        before = [k.clone() for k in cache.keys]
        branch = cache.clone()
        out_a = torch.cat([model(a[:, i:i + 1], kv_cache=cache) for i in range(3)], 1)
        out_b = torch.cat([model(b[:, i:i + 1], kv_cache=branch) for i in range(3)], 1)
        ref_a = model(torch.cat([prompt, a], 1))[:, 6:]
        ref_b = model(torch.cat([prompt, b], 1))[:, 6:]
    torch.testing.assert_close(out_a, ref_a, **TOL)
    torch.testing.assert_close(out_b, ref_b, **TOL)
    assert cache.seen == branch.seen == 9
    assert not torch.equal(cache.keys[0][:, :, 6:], branch.keys[0][:, :, 6:])
    for k, k0 in zip(branch.keys, before):               # the shared prefix is untouched in both
        assert torch.equal(k[:, :, :6], k0)
    assert all(kb.data_ptr() != ka.data_ptr() for ka, kb in zip(cache.keys, branch.keys))


def test_mismatched_batch_is_refused_and_nothing_changes():
    model = _model()
    cache = KVCache.for_model(model)
    with torch.no_grad():
        model(_ids(1, 4), kv_cache=cache)
        with pytest.raises(KVCacheError, match="batch=1"):
            model(_ids(2, 1), kv_cache=cache)
        cache.rollback()
        assert cache.seen == 4 and [cache.length(i) for i in range(3)] == [4, 4, 4]
        model(_ids(1, 1), kv_cache=cache)              # still usable
    assert cache.seen == 5


def test_interrupted_forward_is_detected_and_rolled_back():
    model = _model()
    ids = _ids(1, 8)
    cache = KVCache.for_model(model)

    def boom(x, hook):
        raise KeyboardInterrupt

    with torch.no_grad():
        model(ids[:, :6], kv_cache=cache)
        with pytest.raises(KeyboardInterrupt):
            model.run_with_hooks(ids[:, 6:7], kv_cache=cache, fwd_hooks=[("blocks.2.hook_resid_pre", boom)])
        # layers 0, 1 were updated, layer 2 was not: the forward's exception rolled them back (hardA)
        assert cache.seen == 6 and all(cache.length(i) == 6 for i in range(cache.n_layers))
        cache.update(0, *[torch.zeros(1, model.cfg.n_kv_heads, 1, model.cfg.d_head)] * 2)   # by hand, half-way
        with pytest.raises(KVCacheError, match="interrupted"):
            model(ids[:, 6:7], kv_cache=cache)           # a half-written cache is still detected
        cache.rollback()
        got = torch.cat([model(ids[:, i:i + 1], kv_cache=cache) for i in (6, 7)], 1)
        torch.testing.assert_close(got, model(ids)[:, 6:], **TOL)


def test_gradients_flow_through_cached_forwards():
    model = _model()
    ids = _ids(1, 6)
    cache = KVCache.for_model(model)
    out = model(ids[:, :4], kv_cache=cache)
    out2 = model(ids[:, 4:5], kv_cache=cache)
    out3 = model(ids[:, 5:6], kv_cache=cache)
    (out.sum() + out2.sum() + out3.sum()).backward()
    grad = model.blocks[0].attn.k_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # same gradient as the uncached forward
    model.zero_grad()
    model(ids).sum().backward()
    torch.testing.assert_close(grad, model.blocks[0].attn.k_proj.weight.grad, atol=1e-4, rtol=1e-4)


def test_bad_construction_is_refused():
    with pytest.raises(ValueError, match="windows"):
        KVCache(3, [None])
    with pytest.raises(ValueError, match="window of layer 0"):
        KVCache(1, [0])
    assert "seen=0" in repr(KVCache(2))
