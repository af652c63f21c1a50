"""hooks/ recipes: each test fails if the recipe were a no-op or did the wrong thing."""

import pytest
import torch
import torch.nn.functional as F

import hooks
from workbench import CommandRConfig, HookedCommandR
from workbench.kv_cache import KVCache

CFG = dict(vocab_size=89, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=80, use_qk_norm=True,
           logit_scale=0.37)
L, H = 3, 4


@pytest.fixture(scope="module")
def model():
    m = HookedCommandR.from_config(CommandRConfig(**CFG), seed=1)
    with torch.no_grad():  # non-unit norms, so a wrong LayerNorm would show
        g = torch.Generator().manual_seed(2)
        for name, p in m.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


def ids(seed=0, batch=2, pos=7):
    return torch.randint(0, 89, (batch, pos), generator=torch.Generator().manual_seed(seed))


def no_hooks_left(model):
    return not any(hp.has_hooks for hp in model.hook_dict.values())


def only(*suffixes):
    return lambda name: name.endswith(suffixes)


# ---------------------------------------------------------------------------------------- record
def test_record_store_append_and_accumulate(model):
    x = ids()
    _, cache = model.run_with_cache(x, names_filter=only("hook_resid_pre"))
    store, fwd = hooks.record(["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"])
    model.run_with_hooks(x, fwd_hooks=fwd)
    assert torch.equal(store["blocks.1.hook_resid_pre"], cache["resid_pre", 1])
    assert torch.equal(store["blocks.2.hook_resid_pre"], cache["resid_pre", 2])

    store, fwd = hooks.record(lambda n: n == "blocks.0.hook_resid_pre", append=True)
    a, b = ids(1, 2, 5), ids(2, 3, 4)
    model.run_with_hooks(a, fwd_hooks=fwd)
    model.run_with_hooks(b, fwd_hooks=fwd)
    got = store["blocks.0.hook_resid_pre"]
    assert [t.shape[:2] for t in got] == [(2, 5), (3, 4)]

    acc, fwd = hooks.accumulate("blocks.0.hook_resid_pre", dims=(0, 1))
    model.run_with_hooks(a, fwd_hooks=fwd)
    model.run_with_hooks(b, fwd_hooks=fwd)
    every_token = torch.cat([got[0].reshape(-1, 48), got[1].reshape(-1, 48)])
    assert acc.counts["blocks.0.hook_resid_pre"] == 10 + 12
    torch.testing.assert_close(acc["blocks.0.hook_resid_pre"].reshape(-1), every_token.mean(0), rtol=1e-6, atol=1e-7)

    acc, fwd = hooks.accumulate("blocks.0.hook_resid_pre", reduce="sum")
    model.run_with_hooks(a, fwd_hooks=fwd)
    model.run_with_hooks(ids(5, 2, 5), fwd_hooks=fwd)
    with pytest.raises(ValueError, match="dims="):
        model.run_with_hooks(b, fwd_hooks=fwd)          # another shape without dims= is refused
    assert no_hooks_left(model)


def test_stop_after_and_run_until(model):
    x = ids()
    _, full = model.run_with_cache(x, names_filter=only("hook_resid_post", "hook_resid_pre"))
    store, fwd = hooks.record(lambda n: n.endswith("hook_resid_post"))
    assert model.run_with_hooks(x, fwd_hooks=fwd + hooks.stop_after(1)) is None
    assert sorted(store) == ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]  # layer 2 never ran
    assert torch.equal(store["blocks.1.hook_resid_post"], full["resid_post", 1])

    cache = hooks.run_until(model, x, layer=0, names_filter=only("hook_resid_post", "hook_resid_pre"))
    assert set(cache.keys()) == {"blocks.0.hook_resid_pre", "blocks.0.hook_resid_post"}
    assert torch.equal(cache["resid_post", 0], full["resid_post", 0])
    assert no_hooks_left(model)


# ---------------------------------------------------------------------------------------- ablate
def test_zero_ablating_a_head_equals_recomputing_without_it(model):
    x, layer, head = ids(), 1, 2
    names = only("hook_z", "hook_attn_out")
    clean_logits, clean = model.run_with_cache(x, names_filter=names)
    logits, abl = model.run_with_cache(x, names_filter=names,
                                       fwd_hooks=[(f"blocks.{layer}.attn.hook_z", hooks.zero_ablate(heads=[head]))])
    # by hand: the layer's output without that head, from the cached (unaffected) hook_z
    z = clean["z", layer].clone()
    z[:, :, head] = 0
    attn_out = F.linear(z.reshape(*z.shape[:2], -1), model.blocks[layer].attn.o_proj.weight)
    assert torch.equal(abl["attn_out", layer], attn_out)
    assert not torch.equal(attn_out, clean["attn_out", layer])
    by_hand = model.run_with_hooks(x, fwd_hooks=[(f"blocks.{layer}.hook_attn_out", lambda t, hook: attn_out)])
    assert torch.equal(logits, by_hand)
    assert not torch.equal(logits, clean_logits)
    # other heads untouched, the ablated head exactly zero
    assert torch.equal(abl["z", layer][:, :, [0, 1, 3]], clean["z", layer][:, :, [0, 1, 3]])
    assert abl["z", layer][:, :, head].abs().max() == 0


def test_pattern_ablation_zeroes_that_heads_z(model):
    x, layer, head = ids(), 0, 1
    model.attn_impl = "explicit"  # hooking the pattern forces the explicit path; compare like with like
    try:
        _, ref = model.run_with_cache(x, names_filter=only("hook_z"))
    finally:
        model.attn_impl = "auto"
    _, abl = model.run_with_cache(x, names_filter=only("hook_z"), fwd_hooks=hooks.ablate_heads(
        {layer: head}, hook="pattern"))
    assert abl["z", layer][:, :, head].abs().max() == 0
    others = [h for h in range(H) if h != head]
    assert torch.equal(abl["z", layer][:, :, others], ref["z", layer][:, :, others])


def test_zero_ablate_positions_is_causal(model):
    x = ids()
    clean_logits = model(x)
    logits, abl = model.run_with_cache(x, names_filter=only("hook_resid_pre"),
                                       fwd_hooks=[("blocks.1.hook_resid_pre", hooks.zero_ablate(positions=[3]))])
    assert abl["resid_pre", 1][:, 3].abs().max() == 0
    assert abl["resid_pre", 1][:, [0, 1, 2, 4, 5, 6]].abs().min() > 0
    assert torch.equal(logits[:, :3], clean_logits[:, :3])       # earlier positions cannot see it
    assert not torch.allclose(logits[:, 3:], clean_logits[:, 3:])


def test_mean_ablation_from_cache_and_dataset(model):
    x, ref_ids = ids(), ids(7, batch=5)
    _, ref = model.run_with_cache(ref_ids, names_filter=only("hook_z"))
    _, abl = model.run_with_cache(x, names_filter=only("hook_z"),
                                  fwd_hooks=[("blocks.2.attn.hook_z", hooks.mean_ablate(ref, heads=[0, 3]))])
    mean = ref["z", 2].mean(0)                                      # [pos head d_head]
    for b in range(2):
        assert torch.equal(abl["z", 2][b][:, [0, 3]], mean[:, [0, 3]])
    _, clean = model.run_with_cache(x, names_filter=only("hook_z"))
    assert torch.equal(abl["z", 2][:, :, [1, 2]], clean["z", 2][:, :, [1, 2]])

    # a dataset of prompts of different lengths -> mean over every token
    batches = [ids(8, 2, 5), ids(9, 3, 6)]
    means = hooks.compute_means(model, batches, ["blocks.0.hook_mlp_out"])
    tokens = []
    for bt in batches:
        _, c = model.run_with_cache(bt, names_filter="blocks.0.hook_mlp_out")
        tokens.append(c["mlp_out", 0].reshape(-1, 48))
    torch.testing.assert_close(means["blocks.0.hook_mlp_out"].reshape(-1), torch.cat(tokens).mean(0),
                               rtol=1e-6, atol=1e-7)
    _, abl = model.run_with_cache(x, names_filter="blocks.0.hook_mlp_out",
                                  fwd_hooks=[("blocks.0.hook_mlp_out", hooks.mean_ablate(means, positions=[2]))])
    assert torch.equal(abl["mlp_out", 0][:, 2], means["blocks.0.hook_mlp_out"].reshape(1, 48).expand(2, 48))


def test_resample_ablation(model):
    x, other = ids(), ids(11, batch=4)
    _, src = model.run_with_cache(other, names_filter=only("hook_z"))
    g = torch.Generator().manual_seed(3)
    fn = hooks.resample_ablate(src, heads=[1], generator=g)
    _, abl = model.run_with_cache(x, names_filter=only("hook_z"), fwd_hooks=[("blocks.1.attn.hook_z", fn)])
    rows = torch.randint(0, 4, (2,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(abl["z", 1][:, :, 1], src["z", 1][rows][:, :, 1])
    # without a generator, row i takes source row i (batches must agree)
    _, src2 = model.run_with_cache(ids(12), names_filter=only("hook_z"))
    _, abl = model.run_with_cache(x, names_filter=only("hook_z"),
                                  fwd_hooks=[("blocks.1.attn.hook_z", hooks.resample_ablate(src2, positions=[0, 4]))])
    assert torch.equal(abl["z", 1][:, [0, 4]], src2["z", 1][:, [0, 4]])
    with pytest.raises(ValueError, match="generator"):
        model.run_with_hooks(x, fwd_hooks=[("blocks.1.attn.hook_z", hooks.resample_ablate(src))])
    assert no_hooks_left(model)


# ---------------------------------------------------------------------------------------- patch
@pytest.fixture(scope="module")
def clean_corrupt(model):
    clean, corrupt = ids(20), ids(21)
    clean_logits, cache = model.run_with_cache(
        clean, names_filter=only("hook_embed", "hook_resid_pre", "hook_resid_post", "hook_z", "hook_mlp_out"))
    return clean, corrupt, clean_logits, cache


@pytest.mark.parametrize("layer", [0, 2])
def test_patching_whole_clean_residual_reproduces_clean_logits(model, clean_corrupt, layer):
    _, corrupt, clean_logits, cache = clean_corrupt
    logits = model.run_with_hooks(corrupt, fwd_hooks=hooks.patch_resid(cache, layer))
    assert torch.equal(logits, clean_logits)
    assert not torch.allclose(model(corrupt), clean_logits)


def test_patching_one_position_and_heads(model, clean_corrupt):
    _, corrupt, clean_logits, cache = clean_corrupt
    corrupt_logits = model(corrupt)
    logits = model.run_with_hooks(corrupt, fwd_hooks=hooks.patch_resid(cache, 1, positions=[4]))
    assert torch.equal(logits[:, :4], corrupt_logits[:, :4])
    assert not torch.allclose(logits[:, 4:], corrupt_logits[:, 4:])
    # the embedding, every head and every MLP at all positions == the clean run
    fwd = [("hook_embed", hooks.patch_from(cache))]
    fwd += [p for layer in range(L) for p in hooks.patch_heads(cache, layer, heads=range(H))]
    fwd += [p for layer in range(L) for p in hooks.patch_mlp(cache, layer)]
    assert torch.equal(model.run_with_hooks(corrupt, fwd_hooks=fwd), clean_logits)


def metric_for(answer=5, wrong=9):
    return lambda logits: hooks.logit_diff(logits, answer, wrong)


def test_logit_diff():
    logits = torch.randn(3, 4, 10)
    want = (logits[:, -1, 5] - logits[:, -1, 9]).mean()
    assert torch.equal(hooks.logit_diff(logits, 5, 9), want)
    per = hooks.logit_diff(logits, torch.tensor([1, 2, 3]), 0, position=1, reduce="none")
    assert torch.equal(per, torch.stack([logits[i, 1, i + 1] - logits[i, 1, 0] for i in range(3)]))


def manual(model, corrupt, name, metric, heads=None, positions=None, cache=None):
    fn = hooks.patch_from(cache, heads=heads, positions=positions)
    return metric(model.run_with_hooks(corrupt, fwd_hooks=[(name, fn)]))


def test_sweep_corners_equal_manual_runs(model, clean_corrupt):
    _, corrupt, clean_logits, cache = clean_corrupt
    metric = metric_for()
    grid = hooks.patch_sweep(model, corrupt, cache, metric, kind="resid_pre")
    assert grid.shape == (L, 7)
    assert grid[0, 0] == manual(model, corrupt, "blocks.0.hook_resid_pre", metric, positions=[0], cache=cache)
    assert grid[-1, -1] == manual(model, corrupt, "blocks.2.hook_resid_pre", metric, positions=[6], cache=cache)
    assert grid[0, 0] != grid[-1, -1]

    heads = hooks.patch_sweep(model, corrupt, cache, metric, kind="z")
    assert heads.shape == (L, H)
    assert heads[0, 0] == manual(model, corrupt, "blocks.0.attn.hook_z", metric, heads=[0], cache=cache)
    assert heads[-1, -1] == manual(model, corrupt, "blocks.2.attn.hook_z", metric, heads=[3], cache=cache)

    by_pos = hooks.patch_sweep(model, corrupt, cache, metric, kind="z", layers=[1, 2], positions=[2, -1])
    assert by_pos.shape == (2, 2, H)
    assert by_pos[1, 1, 2] == manual(model, corrupt, "blocks.2.attn.hook_z", metric, heads=[2], positions=[6],
                                     cache=cache)

    mlp = hooks.patch_sweep(model, corrupt, cache, metric, kind="mlp_out", positions=None)
    assert mlp.shape == (L,)
    assert mlp[1] == manual(model, corrupt, "blocks.1.hook_mlp_out", metric, cache=cache)

    # the final residual at the last position decides the last logits: the clean metric, exactly
    last = hooks.patch_sweep(model, corrupt, cache, metric, kind="resid_post", layers=[-1], positions=[-1])
    assert last.item() == metric(clean_logits).item()
    assert last.item() != metric(model(corrupt)).item()


def test_sweep_bad_input(model, clean_corrupt):
    _, corrupt, _, cache = clean_corrupt
    with pytest.raises(KeyError, match="attn_out"):
        hooks.patch_sweep(model, corrupt, cache, metric_for(), kind="attn_out")
    with pytest.raises(ValueError, match="kind"):
        hooks.patch_sweep(model, corrupt, cache, metric_for(), kind="resid_mid")
    with pytest.raises(ValueError, match="head axis"):
        hooks.patch_sweep(model, corrupt, cache, metric_for(), kind="resid_pre", heads="all")
    with pytest.raises(ValueError, match="does not match"):
        model.run_with_hooks(ids(3, 2, 5), fwd_hooks=hooks.patch_resid(cache, 0))
    assert no_hooks_left(model)


# ---------------------------------------------------------------------------------------- steer
def test_steering_add_equals_adding_by_hand(model):
    x = ids()
    v = torch.randn(48, generator=torch.Generator().manual_seed(4))
    clean_logits, clean = model.run_with_cache(x, names_filter="blocks.1.hook_resid_pre")
    logits, steered = model.run_with_cache(x, names_filter="blocks.1.hook_resid_pre",
                                           fwd_hooks=hooks.steer(1, v, coeff=3.0))
    by_hand = clean["resid_pre", 1] + 3.0 * v
    assert torch.equal(steered["resid_pre", 1], by_hand)
    assert torch.equal(logits, model.run_with_hooks(x, fwd_hooks=[("blocks.1.hook_resid_pre", lambda t, h: by_hand)]))
    assert not torch.allclose(logits, clean_logits)

    # only position 2
    _, one = model.run_with_cache(x, names_filter="blocks.1.hook_resid_pre",
                                  fwd_hooks=hooks.steer(1, v, coeff=3.0, positions=[2]))
    want = clean["resid_pre", 1].clone()
    want[:, 2] += 3.0 * v
    assert torch.equal(one["resid_pre", 1], want)


def test_steering_scale_and_project(model):
    x = ids()
    v = torch.randn(48, generator=torch.Generator().manual_seed(5))
    u = v / v.norm()
    _, clean = model.run_with_cache(x, names_filter="blocks.2.hook_resid_post")
    r = clean["resid_post", 2]
    _, proj = model.run_with_cache(x, names_filter="blocks.2.hook_resid_post",
                                   fwd_hooks=hooks.steer(2, v, mode="project", hook="resid_post"))
    p = proj["resid_post", 2]
    assert (p @ u).abs().max() < 1e-5 < (r @ u).abs().max()
    torch.testing.assert_close(p, r - (r @ u)[..., None] * u, rtol=1e-5, atol=1e-6)
    _, dbl = model.run_with_cache(x, names_filter="blocks.2.hook_resid_post",
                                  fwd_hooks=hooks.steer(2, v, mode="scale", factor=2.0, hook="resid_post"))
    torch.testing.assert_close(dbl["resid_post", 2] @ u, 2 * (r @ u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dbl["resid_post", 2] - (dbl["resid_post", 2] @ u)[..., None] * u,
                               r - (r @ u)[..., None] * u, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last axis"):
        model.run_with_hooks(x, fwd_hooks=[("blocks.0.attn.hook_z", hooks.add_direction(v))])
    with pytest.raises(ValueError, match="where"):
        hooks.add_direction(v, where="decode")


def cached_greedy(model, prompt, n_new, fwd_prefill=(), fwd_decode=(), step_ctx=True):
    """A cached greedy loop setting ``hook_ctx.step`` as generation does; returns per-step logits."""
    kv = KVCache.for_model(model)
    out, tok = [], None
    try:
        for step in range(n_new + 1):
            if step_ctx:
                model.hook_ctx.step = step
            with model.hooks(fwd_hooks=list(fwd_prefill if step == 0 else fwd_decode)):
                logits = model(prompt if step == 0 else tok, kv_cache=kv)[:, -1]
            out.append(logits)
            tok = logits.argmax(-1, keepdim=True)
    finally:
        model.hook_ctx.step = None
    return out


def test_step_aware_steering_in_cached_loop(model):
    x = ids(pos=5)
    v = 2.0 * torch.randn(48, generator=torch.Generator().manual_seed(6))
    plain = hooks.steer([0, 1], v)                               # acts always (the by-hand version)
    base = cached_greedy(model, x, 3)
    new = cached_greedy(model, x, 3, hooks.steer([0, 1], v, where="new"), hooks.steer([0, 1], v, where="new"))
    want = cached_greedy(model, x, 3, (), plain, step_ctx=False)
    assert torch.equal(new[0], base[0])                          # prompt untouched
    assert all(torch.equal(a, b) for a, b in zip(new, want))
    assert not torch.allclose(new[1], base[1])

    prompt = cached_greedy(model, x, 3, hooks.steer([0, 1], v, where="prompt"), hooks.steer([0, 1], v, where="prompt"))
    want = cached_greedy(model, x, 3, plain, (), step_ctx=False)
    assert all(torch.equal(a, b) for a, b in zip(prompt, want))
    assert not torch.allclose(prompt[0], base[0])

    # absolute positions: only the first generated token (position 5) is steered
    at5 = hooks.steer([0, 1], v, positions=[5])
    got = cached_greedy(model, x, 3, at5, at5)
    kv = KVCache.for_model(model)
    model(x, kv_cache=kv)
    first_tok = base[0].argmax(-1, keepdim=True)
    with model.hooks(fwd_hooks=plain):
        step1 = model(first_tok, kv_cache=kv)[:, -1]
    assert torch.equal(got[0], base[0]) and torch.equal(got[1], step1)
    assert no_hooks_left(model) and model.hook_ctx.step is None


def test_step_aware_steering_with_generate(model):
    gen = pytest.importorskip("workbench.generation")
    x = ids(pos=5)
    v = 2.0 * torch.randn(48, generator=torch.Generator().manual_seed(6))
    base = gen.generate(model, x, max_new_tokens=4)
    steered = gen.generate(model, x, max_new_tokens=4, fwd_hooks=hooks.steer([0, 1], v, where="new"))
    manual_logits = cached_greedy(model, x, 3, (), hooks.steer([0, 1], v), step_ctx=False)
    assert torch.equal(steered[:, :6], base[:, :6])              # the prefill's token is unsteered
    want = torch.stack([lg.argmax(-1) for lg in manual_logits], 1)
    assert torch.equal(steered[:, 5:], want)


# ---------------------------------------------------------------------------------------- knockout
def test_knockout_zeroes_and_renormalises(model):
    x = ids()
    model.attn_impl = "explicit"
    try:
        _, clean = model.run_with_cache(x, names_filter=only("hook_attn_scores", "hook_pattern"))
    finally:
        model.attn_impl = "auto"
    fwd = hooks.knockout_hooks(1, queries=[4, 6], keys=[0, 2], heads=[1, 3])
    _, ko = model.run_with_cache(x, names_filter=only("hook_pattern"), fwd_hooks=fwd)
    pat, ref, scores = ko["pattern", 1], clean["pattern", 1], clean["attn_scores", 1]
    for q in (4, 6):
        for h in (1, 3):
            assert pat[:, h, q, [0, 2]].abs().max() == 0
            keep = [k for k in range(q + 1) if k not in (0, 2)]
            torch.testing.assert_close(pat[:, h, q, keep], scores[:, h, q, keep].softmax(-1), rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(pat[:, h, q].sum(-1), torch.ones(2))
    untouched = torch.ones_like(pat, dtype=torch.bool)
    untouched[:, [1, 3]] = False
    untouched[:, :, [0, 1, 2, 3, 5]] = True
    untouched[:, [0, 2]] = True
    assert torch.equal(pat[untouched], ref[untouched])
    assert torch.equal(ko["pattern", 0], clean["pattern", 0])   # other layers unaffected
    with pytest.raises(ValueError, match="every visible key"):
        model.run_with_hooks(x, fwd_hooks=hooks.knockout_hooks(0, queries=[1], keys=[0, 1]))
    assert no_hooks_left(model)


def test_knockout_cached_equals_uncached(model):
    x = ids(pos=6)
    nxt = ids(30, pos=1)
    fwd = hooks.knockout_hooks(range(L), queries=[6], keys=[1, 3])
    full = model.run_with_hooks(torch.cat([x, nxt], 1), fwd_hooks=fwd)[:, -1]
    kv = KVCache.for_model(model)
    model(x, kv_cache=kv)
    step = model.run_with_hooks(nxt, fwd_hooks=fwd, kv_cache=kv)[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full, model(torch.cat([x, nxt], 1))[:, -1])
