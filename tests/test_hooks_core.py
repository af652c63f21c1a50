"""The hook registry: names, shapes, firing, identity, cleanup, errors."""

import gc
import resource

import pytest
import torch

from workbench import CommandRConfig, ConfigError, HookedCommandR, HookError, StopForward

CFG = dict(vocab_size=101, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=96, use_qk_norm=True)

BLOCK_HOOKS = [
    "hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
    "attn.hook_q_normed", "attn.hook_k_normed", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores",
    "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "hook_attn_out", "mlp.hook_pre",
    "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
]
TOP_HOOKS = ["hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized", "hook_logits_unscaled", "hook_logits"]


@pytest.fixture(scope="module")
def model():
    m = HookedCommandR.from_config(CommandRConfig(**CFG), seed=0)
    with torch.no_grad():  # non-unit norms so the LayerNorm weight matters
        for name, p in m.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.3 * torch.randn_like(p))
    return m


def _ids(batch=2, pos=7):
    return torch.randint(0, 101, (batch, pos), generator=torch.Generator().manual_seed(0))


def _expected_names(n_layers):
    names = set(TOP_HOOKS)
    for i in range(n_layers):
        names |= {f"blocks.{i}.{h}" for h in BLOCK_HOOKS}
    return names


def test_every_hook_exists_fires_once_with_documented_shape(model):
    assert set(model.hook_dict) == _expected_names(3)
    calls = {}

    def count(x, hook):
        calls.setdefault(hook.name, []).append((tuple(x.shape), x.dtype))

    ids = _ids()
    model.run_with_hooks(ids, fwd_hooks=[(lambda n: True, count)])
    table = {r["name"]: r for r in model.hook_table(2, 7)}
    assert set(calls) == set(model.hook_dict)
    for name, seen in calls.items():
        assert len(seen) == 1, f"{name} fired {len(seen)} times"
        assert seen[0] == (table[name]["shape"], table[name]["dtype"]), name
    assert table["blocks.0.attn.hook_pattern"]["shape"] == (2, 4, 7, 7)
    assert table["blocks.0.attn.hook_k"]["shape"] == (2, 7, 2, 16)
    assert table["blocks.0.ln1.hook_scale"]["dtype"] == torch.float32


def test_hook_layer_and_ctx(model):
    seen = {}
    model.run_with_hooks(_ids(), fwd_hooks=[
        ("blocks.2.hook_resid_pre", lambda x, hook: seen.update(layer=hook.layer, pos=hook.ctx.positions.clone())),
        ("hook_embed", lambda x, hook: seen.update(embed_layer=hook.layer)),
    ])
    assert seen["layer"] == 2 and seen["embed_layer"] is None
    assert seen["pos"].tolist() == [list(range(7))]


@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_identity_hooks_bitwise(model, impl):
    ids = _ids()
    model.attn_impl = "explicit"
    try:
        explicit_ref = model(ids)
        model.attn_impl = impl
        plain = model(ids)
        skip = ("hook_result", "hook_pattern", "hook_attn_scores")
        # identity on everything except hooks that change the computation path
        hooked = model.run_with_hooks(ids, fwd_hooks=[(lambda n: not n.endswith(skip), lambda x, hook: x)])
        assert torch.equal(hooked, plain)
        none_hooks = model.run_with_hooks(ids, fwd_hooks=[(lambda n: not n.endswith(skip), lambda x, hook: None)])
        assert torch.equal(none_hooks, plain)
        # hooking the pattern forces the explicit path, whatever attn_impl says
        with_pattern = model.run_with_hooks(ids, fwd_hooks=[(lambda n: n.endswith(("hook_pattern", "hook_attn_scores")),
                                                             lambda x, hook: x)])
        assert torch.equal(with_pattern, explicit_ref)
        # hook_result sums per-head outputs: equal within float rounding
        with_result = model.run_with_hooks(ids, fwd_hooks=[(lambda n: n.endswith("hook_result"), lambda x, hook: x)])
        torch.testing.assert_close(with_result, plain, atol=1e-5, rtol=1e-5)
    finally:
        model.attn_impl = "auto"


def test_hook_result_sums_to_attn_out(model):
    _, cache = model.run_with_cache(_ids(), names_filter=lambda n: n.endswith(("hook_result", "hook_attn_out")))
    for i in range(3):
        torch.testing.assert_close(cache["result", i].sum(2), cache["attn_out", i], atol=1e-6, rtol=1e-5)


def test_zero_head_z_equals_model_without_head(model):
    ids, layer, head = _ids(), 1, 2
    d = model.cfg.d_head

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, head] = 0
        return z

    hooked = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)])
    # by hand: the same model with the head's columns of o_proj removed
    W = model.blocks[layer].attn.o_proj.weight
    saved = W.detach().clone()
    try:
        with torch.no_grad():
            W[:, head * d:(head + 1) * d] = 0
            by_hand = model(ids)
    finally:
        with torch.no_grad():
            W.copy_(saved)
    assert torch.equal(hooked, by_hand)
    assert not torch.equal(hooked, model(ids))


def test_patching_changes_downstream(model):
    ids = _ids()
    clean = model(ids)
    out = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x * 0)])
    assert not torch.allclose(out, clean)


def test_raising_hooks_leave_nothing_attached_and_memory_flat(model):
    ids = _ids(1, 5)

    def boom(x, hook):
        raise RuntimeError("boom")

    def run(n):
        for _ in range(n):
            with pytest.raises(RuntimeError, match="boom"):
                model.run_with_hooks(ids, fwd_hooks=[("blocks.1.mlp.hook_post", boom), ("hook_embed", lambda x, h: x)])

    run(50)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(1000)
    gc.collect()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert all(not hp.has_hooks for hp in model.hook_dict.values())
    assert after - before < 20 * 1024, f"peak RSS grew by {(after - before) / 1024:.1f} MB"

    # nothing keeps a raising hook (or what it closes over) alive
    import weakref

    class Payload:
        pass

    payload = Payload()
    ref = weakref.ref(payload)

    def boom_with_payload(x, hook, payload=payload):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", boom_with_payload)])
    del payload, boom_with_payload
    gc.collect()
    assert ref() is None


def test_keyboard_interrupt_in_hook_cleans_up(model):
    def interrupt(x, hook):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        model.run_with_hooks(_ids(), fwd_hooks=[("hook_logits", interrupt)])
    assert all(not hp.has_hooks for hp in model.hook_dict.values())


def test_unknown_name_suggests_closest(model):
    with pytest.raises(HookError, match=r"blocks\.0\.attn\.hook_pattern"):
        model.run_with_hooks(_ids(), fwd_hooks=[("blocks.0.attn.hook_patern", lambda x, h: x)])
    # a bad name among good ones attaches nothing
    with pytest.raises(HookError):
        with model.hooks(fwd_hooks=[("hook_embed", lambda x, h: x), ("nope", lambda x, h: x)]):
            pass
    assert all(not hp.has_hooks for hp in model.hook_dict.values())


def test_wrong_shape_or_dtype_names_hook(model):
    with pytest.raises(HookError, match=r"blocks\.1\.hook_resid_post.*\(2, 7, 64\)"):
        model.run_with_hooks(_ids(), fwd_hooks=[("blocks.1.hook_resid_post", lambda x, h: x[:, :3])])
    with pytest.raises(HookError, match=r"hook_embed.*float32"):
        model.run_with_hooks(_ids(), fwd_hooks=[("hook_embed", lambda x, h: x.double())])
    assert all(not hp.has_hooks for hp in model.hook_dict.values())


def test_stop_forward(model):
    seen = []

    def stop(x, hook):
        seen.append(hook.name)
        raise StopForward

    assert model.run_with_hooks(_ids(), fwd_hooks=[("blocks.0.hook_resid_post", stop)]) is None
    _, cache = model.run_with_cache(_ids(), fwd_hooks=[("blocks.1.hook_resid_pre", stop)])
    assert "blocks.0.hook_resid_post" in cache and "blocks.2.hook_resid_pre" not in cache


def test_backward_hooks_and_gradients(model):
    ids = _ids()
    grads = {}
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, h: None)],
                     bwd_hooks=[("blocks.0.hook_resid_post", lambda g, h: grads.update(g=g.clone()))]):
        logits = model(ids)
        logits[:, -1, 3].sum().backward()
    assert grads["g"].shape == (2, 7, 64) and grads["g"].abs().sum() > 0
    assert model.blocks[0].attn.q_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)
    # after the block the gradient hook no longer fires
    grads.clear()
    model(ids)[:, -1, 3].sum().backward()
    assert not grads
    model.zero_grad(set_to_none=True)


def test_frozen_ln_scale_reproduces_forward(model):
    ids = _ids()
    logits, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_scale"))
    frozen = model.run_with_hooks(ids, fwd_hooks=[
        (name, (lambda saved: lambda x, h: saved.clone())(t)) for name, t in cache.items()])
    torch.testing.assert_close(frozen, logits, atol=1e-6, rtol=1e-5)
    doubled = model.run_with_hooks(ids, fwd_hooks=[("ln_final.hook_scale", lambda x, h: x * 2)])
    torch.testing.assert_close(doubled, logits / 2, atol=1e-6, rtol=1e-4)


def test_cache_shorthand_and_device(model):
    logits, cache = model.run_with_cache(_ids(), device="cpu")
    assert torch.equal(cache["pattern", 1], cache["blocks.1.attn.hook_pattern"])
    assert torch.equal(cache["resid_post", -1], cache["blocks.2.hook_resid_post"])
    assert torch.equal(cache["scale", 2], cache["blocks.2.ln1.hook_scale"])
    assert torch.equal(cache["logits"], logits)
    assert len(cache.keys()) == len(model.hook_dict)
    assert cache.to("cpu")["z", 0].device.type == "cpu"
    with pytest.raises(KeyError, match="closest"):
        cache["blocks.0.attn.hook_patern"]
    _, small = model.run_with_cache(_ids(), names_filter="hook_embed")
    assert list(small.keys()) == ["hook_embed"]


def test_meta_model_hook_table_without_weights():
    cfg = CommandRConfig.from_preset("command-r-plus")
    model = HookedCommandR.from_config(cfg, device="meta")
    rows = model.hook_table(batch=1, pos=8192)
    by = {r["name"]: r for r in rows}
    assert by["blocks.63.attn.hook_pattern"]["shape"] == (1, 96, 8192, 8192)
    assert by["blocks.0.attn.hook_k_normed"]["shape"] == (1, 8192, 8, 128)
    assert by["hook_logits"]["shape"] == (1, 8192, 256000)
    assert abs(cfg.n_params / 1e9 - 103.8) < 1.0


@pytest.mark.parametrize("change, field", [
    (dict(hidden_size=65), "hidden_size"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=15, hidden_size=60, num_attention_heads=4), "head_dim"),
    (dict(model_type="llama"), "model_type"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_bad_config_names_field(change, field):
    base = dict(model_type="cohere", vocab_size=10, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, intermediate_size=32)
    with pytest.raises(ConfigError, match=field):
        CommandRConfig.from_dict({**base, **change})


def test_missing_config_keys_listed():
    with pytest.raises(ConfigError, match="intermediate_size"):
        CommandRConfig.from_dict(dict(model_type="cohere", vocab_size=10, hidden_size=64,
                                      num_hidden_layers=2, num_attention_heads=4))


def test_both_config_spellings():
    base = dict(model_type="cohere", vocab_size=10, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=32)
    v4 = CommandRConfig.from_dict({**base, "rope_theta": 8e6, "torch_dtype": "float16"})
    v5 = CommandRConfig.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 8e6},
                                   "dtype": "float16"})
    assert v4.rope_theta == v5.rope_theta == 8e6
    assert v4.torch_dtype == v5.torch_dtype == torch.float16
    assert CommandRConfig.from_preset("command-r-v01").n_kv_heads == 64


def test_ln1_scale_edits_in_and_out_of_place_and_backward(model):
    ids = _ids()
    w = model.blocks[0].ln1.weight
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w.mul_(0.5)
            want = model(ids)            # doubling the divisor == halving the LayerNorm weight
    finally:
        with torch.no_grad():
            w.copy_(saved)

    def in_place(x, hook):
        x.mul_(2)

    out_of_place = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.ln1.hook_scale", lambda x, h: x * 2)])
    edited = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.ln1.hook_scale", in_place)])
    torch.testing.assert_close(out_of_place, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(edited, want, atol=1e-6, rtol=1e-5)
    fired = []
    with model.hooks(fwd_hooks=[("blocks.0.ln1.hook_scale", lambda x, h: None)],
                     bwd_hooks=[("blocks.0.ln1.hook_scale", lambda g, h: fired.append(g.shape))]):
        logits = model(ids)
        assert torch.equal(logits, model(ids))        # listening changes nothing
        logits[:, -1].sum().backward()
    model.zero_grad(set_to_none=True)
    assert fired == [torch.Size([2, 7, 1])]


def test_identity_hooks_bitwise_bf16():
    m = HookedCommandR.from_config(CommandRConfig(**CFG), seed=1, dtype=torch.bfloat16)
    ids = _ids()
    plain = m(ids)
    hooked = m.run_with_hooks(ids, fwd_hooks=[(lambda n: not n.endswith("hook_result"), lambda x, h: x.clone())])
    m.attn_impl = "explicit"
    assert torch.equal(hooked, m(ids))
    assert plain.dtype == torch.bfloat16


def test_bad_inputs_refused_before_anything_runs(model):
    fired = []
    with model.hooks(fwd_hooks=[("hook_embed", lambda x, h: fired.append(1))]):
        with pytest.raises(ValueError, match="vocab_size=101"):
            model(torch.tensor([[1, 2, 101]]))
        with pytest.raises(ValueError, match="attention_mask"):
            model(_ids(), attention_mask=torch.ones(2, 3))
        with pytest.raises(ValueError, match="position_ids"):
            model(_ids(), position_ids=torch.arange(5)[None])
        with pytest.raises(ValueError, match="input_ids"):
            model(torch.randn(2, 3))
    assert fired == []
    with pytest.raises(ValueError, match="attn_impl"):
        model.attn_impl = "eager"


def test_names_filter_typo_and_cache_device(model):
    with pytest.raises(HookError, match="closest"):
        model.run_with_cache(_ids(), names_filter="blocks.0.attn.hook_patern")
    _, cache = model.run_with_cache(_ids(), names_filter=["hook_embed"], device="meta")
    assert cache["hook_embed"].device.type == "meta"


def test_backward_hook_wrong_shape_names_hook(model):
    with model.hooks(bwd_hooks=[("blocks.1.hook_resid_post", lambda g, h: g[:, :1])]):
        logits = model(_ids())
        with pytest.raises(HookError, match=r"blocks\.1\.hook_resid_post \(backward\)"):
            logits.sum().backward()
    model.zero_grad(set_to_none=True)


def test_pattern_equals_reference_attentions(tmp_path):
    from _reference import load_reference, make_hf_checkpoint

    path = make_hf_checkpoint(tmp_path, seed=4)
    ref = load_reference(path, torch.bfloat16)
    ours = HookedCommandR.from_pretrained(path, dtype=torch.bfloat16)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        attentions = ref(ids, output_attentions=True).attentions
        _, cache = ours.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    for i, a in enumerate(attentions):
        assert torch.equal(cache["pattern", i], a)


def test_cohere_config_ignores_sliding_keys_like_transformers():
    base = dict(model_type="cohere", vocab_size=10, hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=32, sliding_window=3, rope_theta=None,
                rope_parameters={"rope_type": "default", "rope_theta": 8e6}, logit_scale=None)
    cfg = CommandRConfig.from_dict(base)
    assert cfg.layer_window(0) is None and cfg.rope_theta == 8e6 and cfg.logit_scale == 0.0625
    with pytest.raises(ConfigError, match="sliding_window_pattern"):
        CommandRConfig.from_dict({**base, "model_type": "cohere2", "sliding_window_pattern": 0})
    with pytest.raises(ConfigError, match="logit_scale"):
        CommandRConfig.from_dict({**base, "logit_scale": "big"})


def test_cached_head_results_equal_hooked_path(model):
    ids = _ids()
    _, lazy = model.run_with_cache(ids)
    _, eager = model.run_with_cache(ids, fwd_hooks=[(lambda n: n.endswith("hook_result"), lambda x, h: None)])
    # layer 0 sees the same z on both paths; later layers differ by the rounding of sum-over-heads
    assert torch.equal(lazy["result", 0], eager["result", 0])
    for i in range(3):
        torch.testing.assert_close(lazy["result", i], eager["result", i], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lazy["result", i].sum(2), lazy["attn_out", i], atol=1e-6, rtol=1e-5)
    assert list(lazy.keys()) == list(model.hook_dict)
    _, stale = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_result"))
    W = model.blocks[0].attn.o_proj.weight
    with torch.no_grad():
        W.mul_(1.0)  # an in-place edit after the forward
    with pytest.raises(RuntimeError, match="o_proj.weight was modified"):
        stale["result", 0]
