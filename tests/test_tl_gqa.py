"""TransformerLens' ``ungroup_grouped_query_attention`` on our grouped-query model (workbench.tl_gqa):
per-query-head keys/values that hooks can read and edit, logits bit for bit the grouped model's, the
QK-norm and rotary applied to what each head really attends with, and a clear error when a hook
indexes query heads on grouped keys/values."""

from __future__ import annotations

import pytest
import torch

from workbench import CommandRConfig, HookedCommandR
from workbench.hook_names import act_name

PROMPTS = ["When David and Emma went to the shops, Emma gave the bag to", "The capital of France is"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    m = HookedCommandR.from_pretrained("command-r-tiny", dtype=torch.float32, progress=False)
    assert m.cfg.n_kv_heads < m.cfg.n_heads and m.cfg.use_qk_norm        # the cases this file is about
    return m


@pytest.fixture(scope="module")
def tokens(model):
    return model.to_tokens(PROMPTS)                     # right-padded batch: the model masks it


@pytest.fixture
def ungrouped(model):
    model.set_ungroup_grouped_query_attention(True)
    yield model
    model.set_ungroup_grouped_query_attention(False)


def run(model, tokens, ungroup: bool, **kwargs):
    """Logits and {full hook name: tensor} (a plain dict: read after the switch is reset)."""
    model.set_ungroup_grouped_query_attention(ungroup)
    try:
        logits, cache = model.run_with_cache(tokens, **kwargs)
        return logits, dict(cache.items())
    finally:
        model.set_ungroup_grouped_query_attention(False)


@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_ungrouped_logits_and_pattern_bitwise_equal_grouped(model, tokens, impl):
    model.attn_impl = impl
    try:
        grouped, g_cache = run(model, tokens, False)
        flat, u_cache = run(model, tokens, True)
    finally:
        model.attn_impl = "auto"
    assert torch.equal(grouped, flat)
    group = model.cfg.n_heads // model.cfg.n_kv_heads
    for layer in range(model.cfg.n_layers):
        for kind in ("k", "v", "k_normed", "rot_k"):
            name = act_name(kind, layer)
            g, u = g_cache[name], u_cache[name]       # [batch pos kv_head d_head] / [batch pos head d_head]
            assert g.shape[2] == model.cfg.n_kv_heads and u.shape[2] == model.cfg.n_heads
            assert torch.equal(u, g.repeat_interleave(group, dim=2))   # head j is kv head j // group
        assert torch.equal(g_cache[act_name("z", layer)], u_cache[act_name("z", layer)])


def test_ungrouped_generation_with_kv_cache_matches(model):
    ids = model.to_tokens("The capital of France is")
    model.set_ungroup_grouped_query_attention(False)
    grouped = model.generate(ids, max_new_tokens=4, do_sample=False)
    model.set_ungroup_grouped_query_attention(True)
    try:
        ungrouped = model.generate(ids, max_new_tokens=4, do_sample=False)
    finally:
        model.set_ungroup_grouped_query_attention(False)
    assert torch.equal(grouped, ungrouped)


def test_patching_a_whole_group_per_head_equals_patching_the_kv_head(model, tokens, ungrouped):
    """Ungrouped, patching query heads 2k and 2k+1 of hook_v one head index at a time (the demos'
    ``v[:, :, head] = clean[:, :, head]``) is the grouped model with kv head k patched."""
    group, layer, kv = model.cfg.n_heads // model.cfg.n_kv_heads, 1, 1
    clean = model.to_tokens(["When Emma and David went to the shops, David gave the bag to", "The capital of Italy is"])
    name = act_name("v", layer)
    _, u_clean = model.run_with_cache(clean, names_filter=name)

    def per_head(v, hook):                              # v [batch pos head d_head]
        for head in range(kv * group, kv * group + group):
            v[:, :, head] = u_clean[name][:, :, head]
        return v

    patched = model.run_with_hooks(tokens, fwd_hooks=[(name, per_head)])
    model.set_ungroup_grouped_query_attention(False)
    _, g_clean = model.run_with_cache(clean, names_filter=name)

    def kv_head(v, hook):                               # v [batch pos kv_head d_head]
        v[:, :, kv] = g_clean[name][:, :, kv]
        return v

    expected = model.run_with_hooks(tokens, fwd_hooks=[(name, kv_head)])
    assert torch.equal(patched, expected)
    assert not torch.equal(patched, model(tokens))      # the patch did something


def test_editing_one_heads_values_changes_only_that_heads_output(model, tokens, ungrouped):
    """Doubling query head j's values doubles its z (z = pattern @ v) and leaves its group-mate alone,
    although both read the same kv head."""
    layer, head = 2, 3
    names = lambda n: n.endswith(("hook_z", "hook_pattern"))        # the same attention path in both runs
    _, base = model.run_with_cache(tokens, names_filter=names)

    def double(v, hook):
        v[:, :, head] *= 2
        return v

    _, edited = model.run_with_cache(tokens, names_filter=names, fwd_hooks=[(act_name("v", layer), double)])
    z0, z1 = base["z", layer], edited["z", layer]       # [batch pos head d_head]
    assert torch.allclose(z1[:, :, head], 2 * z0[:, :, head], rtol=1e-5, atol=1e-6)
    others = [h for h in range(model.cfg.n_heads) if h != head]
    assert torch.equal(z1[:, :, others], z0[:, :, others])
    # independent of the model's attention code: z of the edited head from the pattern and doubled values
    _, values = model.run_with_cache(tokens, names_filter=act_name("v", layer))
    v = values["v", layer][:, :, head]                                         # [batch k_pos d_head]
    z = torch.einsum("bqk,bkd->bqd", base["pattern", layer][:, head], 2 * v)   # [batch q_pos d_head]
    assert torch.allclose(z1[:, :, head], z, rtol=1e-4, atol=1e-5)


def test_key_edit_reaches_only_that_heads_pattern_through_norm_and_rotary(model, tokens, ungrouped):
    """An edit to ungrouped hook_k passes through the per-head QK-norm and rotary of that head only."""
    layer, head = 1, 2
    _, base = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_pattern", "hook_k_normed")))

    def shift(k, hook):
        k[:, :, head] = k[:, :, head].flip(-1)
        return k

    _, edited = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_pattern", "hook_k_normed")),
                                     fwd_hooks=[(act_name("k", layer), shift)])
    p0, p1 = base["pattern", layer], edited["pattern", layer]          # [batch head q_pos k_pos]
    others = [h for h in range(model.cfg.n_heads) if h != head]
    assert torch.equal(p1[:, others], p0[:, others]) and not torch.allclose(p1[:, head], p0[:, head])
    # the edited head's keys were normalised with its own kv head's QK-norm weight
    attn = model.blocks[layer].attn
    group = model.cfg.n_heads // model.cfg.n_kv_heads
    _, raw = model.run_with_cache(tokens, names_filter=act_name("k", layer))
    x = raw["k", layer][:, :, head].flip(-1)                            # [batch pos d_head]
    expected = torch.nn.functional.layer_norm(x, x.shape[-1:], eps=attn.k_norm.eps) * attn.k_norm.weight[head // group]
    assert torch.allclose(edited["k_normed", layer][:, :, head], expected, atol=1e-5)


def test_grouped_hook_indexing_a_query_head_names_the_switch(model, tokens):
    model.set_ungroup_grouped_query_attention(False)

    def ablate(v, hook):
        v[:, :, model.cfg.n_heads - 1] = 0.0
        return v

    with pytest.raises(IndexError, match=r"set_ungroup_grouped_query_attention\(True\)"):
        model.run_with_hooks(tokens, fwd_hooks=[(act_name("v", 0), ablate)])
    assert torch.equal(model(tokens), model(tokens))   # hooks were cleaned up; the model still runs


def test_flag_round_trips_and_is_validated(model):
    cfg = model.cfg
    assert cfg.ungroup_grouped_query_attention is False                 # TransformerLens' default
    model.set_ungroup_grouped_query_attention(True)
    assert cfg.ungroup_grouped_query_attention is True and cfg.n_key_value_heads == cfg.n_heads
    rows = {r["name"]: r["shape"] for r in model.hook_table(batch=1, pos=5)}
    assert rows[act_name("v", 0)] == (1, 5, cfg.n_heads, cfg.d_head)
    cfg.ungroup_grouped_query_attention = False
    rows = {r["name"]: r["shape"] for r in model.hook_table(batch=1, pos=5)}
    assert rows[act_name("v", 0)] == (1, 5, cfg.n_kv_heads, cfg.d_head)
    with pytest.raises(ValueError, match="ungroup_grouped_query_attention"):
        model.set_ungroup_grouped_query_attention("false")
    assert cfg.ungroup_grouped_query_attention is False and cfg.n_key_value_heads == cfg.n_kv_heads
    assert "ungroup" not in str(cfg.to_dict())                          # a runtime switch, not saved


def test_without_gqa_the_switch_changes_nothing():
    cfg = CommandRConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_mlp=64)
    m = HookedCommandR.from_config(cfg, seed=0)
    x = torch.randint(0, 64, (1, 6))
    _, before = m.run_with_cache(x)
    m.set_ungroup_grouped_query_attention(True)
    _, after = m.run_with_cache(x)
    assert all(torch.equal(before[n], after[n]) for n in before.keys())


@pytest.mark.parametrize("ungroup", [False, True])
def test_transformer_lens_value_patching_matches_our_per_head_patch(model, ungroup):
    """transformer_lens.patching's value patching runs on our GQA model and each cell equals our own
    patch of that head index. 2.x/3.x loop over n_heads (grouped: the IndexError names the switch),
    4.x over cfg.n_key_value_heads, which is n_heads once ungrouped: either way every per-head copy."""
    pytest.importorskip("transformer_lens", reason="transformer-lens is not installed")
    import transformer_lens.patching as patching
    clean, corrupt = model.to_tokens("The capital of France is"), model.to_tokens("The capital of Italy is")
    paris, rome = model.to_single_token(" Paris"), model.to_single_token(" Rome")

    def metric(logits):
        return logits[0, -1, paris] - logits[0, -1, rome]

    model.set_ungroup_grouped_query_attention(ungroup)
    try:
        _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_v"))
        try:
            theirs = patching.get_act_patch_attn_head_v_all_pos(model, corrupt, clean_cache, metric)  # [layer head]
        except IndexError as exc:
            assert not ungroup and "set_ungroup_grouped_query_attention(True)" in str(exc)
            return
        assert theirs.shape[0] == model.cfg.n_layers
        assert theirs.shape[1] == (model.cfg.n_heads if ungroup else model.cfg.n_kv_heads)   # every head the hook has
        for layer in range(model.cfg.n_layers):
            for head in range(theirs.shape[1]):
                def patch(v, hook, head=head, layer=layer):
                    v[:, :, head] = clean_cache["v", layer][:, :, head]
                    return v
                ours = metric(model.run_with_hooks(corrupt, fwd_hooks=[(act_name("v", layer), patch)]))
                assert torch.allclose(theirs[layer, head], ours, atol=1e-5)
    finally:
        model.set_ungroup_grouped_query_attention(False)


def test_reading_a_cache_made_before_the_switch_flipped_warns(model, tokens):
    """A grouped cache read while the model is ungrouped (or the reverse) warns: head index j of the
    cached tensor is not head j of the hook any more."""
    import warnings
    model.set_ungroup_grouped_query_attention(False)
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_v", "hook_z")))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache["v", 0], cache["z", 0]                     # same layout as the hook: silent
    model.set_ungroup_grouped_query_attention(True)
    try:
        with pytest.warns(UserWarning, match="ungroup_grouped_query_attention=True"):
            cache["v", 0]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cache["z", 0]                                # per query head either way
    finally:
        model.set_ungroup_grouped_query_attention(False)
