"""Attribution patching (AtP, IG) against exact patching; batched exact patching against unbatched."""

import pytest
import torch

import hooks
from _reference import make_hf_checkpoint
from conftest import jittered_model
from workbench import HookedCommandR
from workbench.analysis import AttributionPatching, attribution_patching, repeated_random_tokens

KINDS = ["resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern", "mlp_post"]
STEM = {"mlp_post": "post"}


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Rank correlation with tied values given their mean rank (exact zeros tie in patching maps)."""
    def ranks(x):
        x = x.flatten().double()
        r = torch.empty_like(x)
        r[x.argsort()] = torch.arange(len(x), dtype=torch.double)
        for v in x.unique():
            r[x == v] = r[x == v].mean()
        return r
    return torch.corrcoef(torch.stack([ranks(a), ranks(b)]))[0, 1].item()


def rank_of(estimate: torch.Tensor, index) -> int:
    """How many cells the estimate puts above cell ``index`` (0 = it is the estimate's largest)."""
    return int((estimate.flatten() > estimate.flatten()[index]).sum())


pytestmark = pytest.mark.usefixtures("one_thread")


def clean_cache_for(model, clean, kind, **kw):
    names = [hooks.hook_name(STEM.get(kind, kind), layer) for layer in range(model.cfg.n_layers)]
    return model.run_with_cache(clean, names_filter=names, **kw)[1]


# ------------------------------------------------------------------ the bundled model's induction task
@pytest.fixture(scope="module")
def tiny():
    return HookedCommandR.from_pretrained("command-r-tiny", progress=False)


@pytest.fixture(scope="module")
def induction(tiny):
    """BOS r r[:-1] -> next token r[-1]; corrupted: the token that induction copies is replaced."""
    S = 10
    toks = repeated_random_tokens(tiny, seq_len=S, n_seqs=4, seed=0, bos_token_id=5, low=8, high=1740)
    clean, answer = toks[:, :-1], toks[:, -1]
    other = repeated_random_tokens(tiny, seq_len=S, n_seqs=4, seed=100, bos_token_id=5, low=8, high=1740)
    corrupt = clean.clone()
    corrupt[:, S] = torch.where(other[:, 1] == answer, other[:, 2], other[:, 1])
    wrong = corrupt[:, S]

    def metric(logits):
        return hooks.logit_diff(logits, answer, wrong)

    with torch.no_grad():
        clean_value, corrupt_value = metric(tiny(clean)).item(), metric(tiny(corrupt)).item()
    assert clean_value > 5 and corrupt_value < -5          # the model really does induction here
    return clean, corrupt, metric, corrupt_value


@pytest.fixture(scope="module")
def exact_maps(tiny, induction):
    clean, corrupt, metric, base = induction
    out = {}
    for kind in ("z", "resid_pre"):
        cache = clean_cache_for(tiny, clean, kind)
        out[kind] = hooks.patch_sweep(tiny, corrupt, cache, metric, kind=kind, batch_size=16) - base
    return out


@pytest.mark.parametrize("kind", ["z", "resid_pre"])               # [layer head], [layer pos]
def test_atp_and_ig_track_exact_patching_on_induction(tiny, induction, exact_maps, kind):
    clean, corrupt, metric, _ = induction
    exact = exact_maps[kind]
    atp = attribution_patching(tiny, clean, corrupt, metric, kind=kind)
    ig = attribution_patching(tiny, clean, corrupt, metric, kind=kind, method="ig", steps=8)
    assert atp.shape == ig.shape == exact.shape
    top = int(exact.flatten().argmax())
    assert exact.flatten()[top] > 1                                   # a real effect to find
    assert spearman(atp, exact) >= 0.6
    assert rank_of(atp, top) < 3
    assert rank_of(ig, top) < 3
    err = lambda est: ((est - exact).norm() / exact.norm()).item()   # noqa: E731
    if kind == "resid_pre":                                           # IG follows the curvature AtP misses
        assert err(ig) < 0.5 * err(atp)
    else:   # per head both are first-order in the other heads (IG moves them all at once): no worse than AtP
        assert err(ig) <= 1.02 * err(atp)
    if kind == "z":
        layer, head = divmod(top, tiny.cfg.n_heads)
        assert layer in (2, 3)                                        # the induction heads


def test_verify_top_patches_the_largest_estimates_exactly(tiny, induction, exact_maps):
    clean, corrupt, metric, base = induction
    res = attribution_patching(tiny, clean, corrupt, metric, kind="resid_pre", verify_top=4, batch_size=3)
    assert isinstance(res, AttributionPatching)
    assert res.corrupted_metric == pytest.approx(base, abs=1e-4)
    with torch.no_grad():
        assert res.clean_metric == pytest.approx(metric(tiny(clean)).item(), abs=1e-4)
    want = res.estimate.abs().flatten().topk(4).indices
    assert sorted(res.exact.indices.tolist()) == sorted(torch.stack(torch.unravel_index(want, res.estimate.shape),
                                                                     1).tolist())
    exact = exact_maps["resid_pre"]
    torch.testing.assert_close(res.exact.values, exact[tuple(res.exact.indices.T)], atol=2e-4, rtol=1e-4)
    dense = res.exact.to_dense(res.estimate.shape)
    assert int(dense.isnan().logical_not().sum()) == 4


# ------------------------------------------------------------------ linear metrics: the estimate is exact
def test_linear_metric_of_the_residual_is_estimated_exactly(tiny, induction):
    clean, corrupt, _, _ = induction
    layer = 2
    name = hooks.hook_name("resid_pre", layer)
    direction = torch.randn(tiny.cfg.d_model, generator=torch.Generator().manual_seed(0))
    seen = {}

    def grab(x, hook):
        seen["x"] = x

    def metric(logits):             # direction · resid_pre[layer] at the last two positions, batch mean
        return (seen["x"][:, -2:].float() @ direction).sum(-1).mean()

    with tiny.hooks(fwd_hooks=[(name, grab)]):
        atp = attribution_patching(tiny, clean, corrupt, metric, kind="resid_pre", layers=[layer])
    _, cache = tiny.run_with_cache(torch.cat([clean, corrupt]), names_filter=name)
    delta = cache[name][:4] - cache[name][4:]                         # [batch pos d_model]
    by_hand = (delta.float() @ direction).mean(0)                      # patch position p alone
    by_hand[:-2] = 0                                                   # the metric does not read them
    assert by_hand.abs().max() > 1
    torch.testing.assert_close(atp[0], by_hand, atol=1e-4, rtol=1e-5)


def test_logit_metric_linear_in_the_final_residual_is_exact(tiny, induction):
    # freezing ln_final's divisor makes the logits linear in the last resid_post: exact AtP
    clean, corrupt, metric, _ = induction
    with torch.no_grad():
        _, c = tiny.run_with_cache(corrupt, names_filter="ln_final.hook_scale")
    frozen = c["ln_final.hook_scale"]

    def freeze_scale(x, hook):      # batched exact runs see copies of the batch, from position p0 on
        return frozen[:, -x.shape[1]:].repeat(x.shape[0] // frozen.shape[0], 1, 1).to(x.dtype)

    freeze = [("ln_final.hook_scale", freeze_scale)]
    last = tiny.cfg.n_layers - 1
    with tiny.hooks(fwd_hooks=freeze):
        res = attribution_patching(tiny, clean, corrupt, metric, kind="resid_post", layers=[last], verify_top=5)
        ig = attribution_patching(tiny, clean, corrupt, metric, kind="resid_post", layers=[last], method="ig",
                                  steps=2)
        _, cache = tiny.run_with_cache(clean, names_filter=hooks.hook_name("resid_post", last))
        with torch.no_grad():
            base = metric(tiny(corrupt)).item()
        exact = hooks.patch_sweep(tiny, corrupt, cache, metric, kind="resid_post", layers=[last]) - base
    assert exact.abs().max() > 1
    torch.testing.assert_close(res.estimate, exact, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(ig, exact, atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(res.exact.values, res.estimate[tuple(res.exact.indices.T)], atol=2e-4, rtol=1e-5)


# ------------------------------------------------------------------ batched exact patching
@pytest.mark.parametrize("kind,kw", [("z", {}), ("resid_pre", dict(layers=[1, 3], positions=[0, 9, 10, 15, -1]))])
def test_batched_sweep_equals_unbatched_on_the_bundled_model(tiny, induction, exact_maps, kind, kw):
    clean, corrupt, metric, _ = induction
    cache = clean_cache_for(tiny, clean, kind)
    one = hooks.patch_sweep(tiny, corrupt, cache, metric, kind=kind, **kw)
    many = hooks.patch_sweep(tiny, corrupt, cache, metric, kind=kind, batch_size=4, **kw)
    assert many.shape == one.shape
    torch.testing.assert_close(many, one, atol=3e-4, rtol=1e-5)
    assert one.max() - one.min() > 1
    if kind == "z":                                   # and the batch of 16 the induction fixture ran
        torch.testing.assert_close(exact_maps["z"] + induction[3], one, atol=3e-4, rtol=1e-5)


CFG = dict(vocab_size=89, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=24, use_qk_norm=True,
           logit_scale=0.37)


@pytest.fixture(scope="module")
def small():
    return jittered_model(CFG, seed=1, norm_seed=2, scale=0.3)


@pytest.fixture(scope="module")
def small_pair():
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 89, (2, 7), generator=g)
    corrupt = clean.clone()
    corrupt[:, 2] = (corrupt[:, 2] + 11) % 89
    return clean, corrupt, lambda logits: hooks.logit_diff(logits, 5, 9)


@pytest.mark.parametrize("kind,kw", [("z", dict(positions=[1, 2, 5], layers=[0, 2])), ("resid_pre", {}),
                                     ("pattern", dict(positions=[2, 6], layers=[1])), ("k", dict(positions=[1, 3, -1])),
                                     ("v", {}), ("q", dict(heads=[2])), ("mlp_out", dict(positions=None)),
                                     ("mlp_post", dict(layers=[1], neurons=[3, 4, 5, 6], positions=[2, 4]))])
def test_batched_sweep_equals_unbatched(small, small_pair, kind, kw):
    clean, corrupt, metric = small_pair
    cache = clean_cache_for(small, clean, kind)
    one = hooks.patch_sweep(small, corrupt, cache, metric, kind=kind, **kw)     # mlp_post: batch 1, patch_batched
    for n in (16, 5):
        many = hooks.patch_sweep(small, corrupt, cache, metric, kind=kind, batch_size=n, **kw)
        assert many.shape == one.shape
        torch.testing.assert_close(many, one, atol=2e-5, rtol=1e-5)
    assert one.std() > 0


def test_batched_sweep_with_attention_mask_equals_unbatched(small, small_pair):
    clean, corrupt, metric = small_pair
    mask = torch.ones_like(corrupt)
    mask[1, :2] = 0                                                     # left padding in row 1
    cache = clean_cache_for(small, clean, "z", attention_mask=mask)
    one = hooks.patch_sweep(small, corrupt, cache, metric, kind="z", positions="all", attention_mask=mask)
    many = hooks.patch_sweep(small, corrupt, cache, metric, kind="z", positions="all", attention_mask=mask,
                             batch_size=7)
    torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-5)
    pos_ids = torch.arange(7).repeat(2, 1)                               # per-row position ids: no KV prefix
    per_row = hooks.patch_sweep(small, corrupt, cache, metric, kind="z", positions="all", attention_mask=mask,
                                position_ids=pos_ids, batch_size=7)
    torch.testing.assert_close(per_row, one, atol=1e-5, rtol=1e-5)


def test_neuron_sweep_equals_patching_one_neuron_by_hand(small, small_pair):
    clean, corrupt, metric = small_pair
    cache = clean_cache_for(small, clean, "mlp_post")
    grid = hooks.patch_sweep(small, corrupt, cache, metric, kind="mlp_post")            # [layer neuron]
    assert grid.shape == (3, 24)
    per_pos = hooks.patch_sweep(small, corrupt, cache, metric, kind="post", layers=[1], positions=[2, 6],
                                neurons=[0, 23], batch_size=3)                          # [1 pos neuron]
    assert per_pos.shape == (1, 2, 2)
    name = hooks.hook_name("post", 1)

    def by_hand(neuron, position=None):
        def fn(x, hook):
            x = x.clone()
            src = cache[name]
            if position is None:
                x[:, :, neuron] = src[:, :, neuron]
            else:
                x[:, position, neuron] = src[:, position, neuron]
            return x
        with torch.no_grad():
            return metric(small.run_with_hooks(corrupt, fwd_hooks=[(name, fn)])).item()

    for neuron in (0, 17, 23):
        assert grid[1, neuron].item() == pytest.approx(by_hand(neuron), abs=1e-5)
    assert per_pos[0, 1, 0].item() == pytest.approx(by_hand(0, 6), abs=1e-5)
    assert per_pos[0, 0, 1].item() == pytest.approx(by_hand(23, 2), abs=1e-5)
    assert grid[1].std() > 0


# ------------------------------------------------------------------ shapes, every kind
@pytest.mark.parametrize("kind", KINDS)
def test_estimates_have_patch_sweeps_shape_for_every_kind(small, small_pair, kind):
    clean, corrupt, metric = small_pair
    cache = clean_cache_for(small, clean, kind)
    variants = [{}, dict(positions="all"), dict(positions=None), dict(layers=[0, -1], positions=[1, -1])]
    if kind in ("z", "q", "k", "v", "pattern"):
        variants.append(dict(heads=[1], positions=[3]))
    if kind == "mlp_post":
        variants.append(dict(neurons=[0, 5, 7], positions="all"))
    for kw in variants:
        want = hooks.patch_sweep(small, corrupt, cache, metric, kind=kind, batch_size=96, **kw).shape
        assert attribution_patching(small, clean, corrupt, metric, kind=kind, **kw).shape == want, kw
        assert attribution_patching(small, clean, corrupt, metric, kind=kind, method="ig", steps=2, **kw).shape == want
    if kind in ("k", "v"):
        assert want[-1] == CFG["n_kv_heads"] or "heads" in kw


def test_estimate_sums_over_what_one_patch_covers(small, small_pair):
    # [layer pos head] summed over pos and head = the whole-layer estimate (AtP is linear in the slice)
    clean, corrupt, metric = small_pair
    cells = attribution_patching(small, clean, corrupt, metric, kind="z", positions="all")
    layer = attribution_patching(small, clean, corrupt, metric, kind="z", positions=None, heads=None)
    torch.testing.assert_close(cells.sum((1, 2)), layer, atol=1e-6, rtol=1e-5)
    assert not any(hp.has_hooks for hp in small.hook_dict.values())
    assert all(p.requires_grad for p in small.parameters())


def test_bad_input(small, small_pair):
    clean, corrupt, metric = small_pair
    with pytest.raises(ValueError, match="same shape"):
        attribution_patching(small, clean, corrupt[:, :5], metric)
    with pytest.raises(ValueError, match="method"):
        attribution_patching(small, clean, corrupt, metric, method="grad")
    with pytest.raises(ValueError, match="steps"):
        attribution_patching(small, clean, corrupt, metric, steps=4)
    with pytest.raises(ValueError, match="head axis"):
        attribution_patching(small, clean, corrupt, metric, kind="resid_pre", heads=[0])
    with pytest.raises(ValueError, match="scalar"):
        attribution_patching(small, clean, corrupt, lambda logits: logits[:, -1, :3])
    with pytest.raises(ValueError, match="no gradient"):
        attribution_patching(small, clean, corrupt, lambda logits: float(hooks.logit_diff(logits, 5, 9)))
    with pytest.raises(ValueError, match="batch_size"):
        hooks.patch_sweep(small, corrupt, clean_cache_for(small, clean, "z"), metric, kind="z", batch_size=0)
    assert not any(hp.has_hooks for hp in small.hook_dict.values())


# ------------------------------------------------------------------ offload and quantization
def test_gradients_through_cpu_and_disk_offload(tmp_path):
    ckpt = make_hf_checkpoint(tmp_path / "ckpt", seed=5)
    plain = HookedCommandR.from_pretrained(ckpt, progress=False)
    off = HookedCommandR.from_pretrained(ckpt, device_map="auto", max_memory={"cpu": 300_000},
                                         offload_folder=str(tmp_path / "offload"), progress=False)
    assert set(off.hf_device_map.values()) == {"cpu", "disk"}
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 97, (2, 9), generator=g)
    corrupt = clean.clone()
    corrupt[:, 3] = (corrupt[:, 3] + 7) % 97
    metric = lambda logits: hooks.logit_diff(logits, 5, 9)              # noqa: E731
    want = attribution_patching(plain, clean, corrupt, metric, kind="z", positions="all")
    got = attribution_patching(off, clean, corrupt, metric, kind="z", positions="all")
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    res = attribution_patching(off, clean, corrupt, metric, kind="resid_pre", method="ig", steps=4, verify_top=3)
    exact = attribution_patching(plain, clean, corrupt, metric, kind="resid_pre", method="ig", steps=4,
                                 verify_top=3)
    torch.testing.assert_close(res.exact.values, exact.exact.values, atol=1e-6, rtol=1e-5)
    assert all(p.requires_grad for n, p in off.named_parameters() if not p.is_meta)


def test_4bit_quantized_model_gradients_or_a_clear_error(tmp_path, bnb):
    ckpt = make_hf_checkpoint(tmp_path / "q", seed=7, hidden_size=128, intermediate_size=256,
                              num_attention_heads=4, num_key_value_heads=2)
    fp32 = HookedCommandR.from_pretrained(ckpt, progress=False)
    q = HookedCommandR.from_pretrained(ckpt, quantization_config={"load_in_4bit": True}, progress=False)
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 97, (2, 9), generator=g)
    corrupt = clean.clone()
    corrupt[:, 3] = (corrupt[:, 3] + 7) % 97
    metric = lambda logits: hooks.logit_diff(logits, 5, 9)              # noqa: E731
    res = attribution_patching(q, clean, corrupt, metric, kind="z", verify_top=3)
    want = attribution_patching(fp32, clean, corrupt, metric, kind="z")
    assert res.estimate.abs().max() > 0                                  # gradients really flowed
    assert spearman(res.estimate, want) > 0.5                            # the same map up to 4-bit noise
    # once bitsandbytes has repacked its CPU weights for inference (a no-grad forward on an AVX512-BF16
    # CPU), its kernel has no gradient: refused, naming the module, instead of silently returning zeros
    repacked = [n for n, m in q.named_modules() if isinstance(m, bnb.nn.Linear4bit)
                and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    if repacked:
        with pytest.raises(RuntimeError, match=repacked[0].replace(".", r"\.")):
            attribution_patching(q, clean, corrupt, metric, kind="z")
