"""The one hook vocabulary: act_name / get_act_name (TransformerLens spellings), and every other
place (the model's hook points, the hook table, the cache shorthand, the recipes' head axes and
patch names) agreeing with it."""

import pytest
import torch

import hooks
from workbench import CommandRConfig, HookedCommandR, act_name, get_act_name
from workbench.hook_names import BLOCK_KINDS, MODEL_KINDS, HookNameError, head_axis, kind_of, pos_axis

CFG = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=48, use_qk_norm=True)


@pytest.fixture(scope="module")
def model():
    return HookedCommandR.from_config(CommandRConfig(**CFG), seed=0)


@pytest.mark.parametrize("args, name", [
    (("pattern", 3), "blocks.3.attn.hook_pattern"),
    (("attn", 3), "blocks.3.attn.hook_pattern"),                 # TL alias
    (("attn_scores", 0), "blocks.0.attn.hook_attn_scores"),
    (("attn_logits", 0), "blocks.0.attn.hook_attn_scores"),
    (("q", 1), "blocks.1.attn.hook_q"), (("k", 1), "blocks.1.attn.hook_k"), (("v", 1), "blocks.1.attn.hook_v"),
    (("z", 2), "blocks.2.attn.hook_z"), (("result", 2), "blocks.2.attn.hook_result"),
    (("result", 2, "a"), "blocks.2.attn.hook_result"),
    (("pre", 1), "blocks.1.mlp.hook_pre"), (("post", 1, "m"), "blocks.1.mlp.hook_post"),
    (("mlp_out", 4), "blocks.4.hook_mlp_out"), (("attn_out", 4), "blocks.4.hook_attn_out"),
    (("resid_pre", 0), "blocks.0.hook_resid_pre"), (("resid_post", 11), "blocks.11.hook_resid_post"),
    (("scale",), "ln_final.hook_scale"), (("normalized",), "ln_final.hook_normalized"),
    (("scale", 2, "ln1"), "blocks.2.ln1.hook_scale"), (("scale", 2), "blocks.2.ln1.hook_scale"),
    (("ln", 2), "blocks.2.ln1.hook_scale"), (("normalized", 1, "ln"), "blocks.1.ln1.hook_normalized"),
    (("embed",), "hook_embed"), (("logits",), "hook_logits"),
    (("k6",), "blocks.6.attn.hook_k"), (("scale4ln1",), "blocks.4.ln1.hook_scale"), (("pattern0",), "blocks.0.attn.hook_pattern"),
    (("blocks.0.hook_resid_pre",), "blocks.0.hook_resid_pre"), (("hook_embed",), "hook_embed"),
])
def test_act_name(args, name):
    assert act_name(*args) == name and get_act_name(*args) == name


@pytest.mark.parametrize("args, match", [
    (("resid_mid", 1), "parallel"), (("scale", 1, "ln2"), "ln2"), (("mid", 0), "SwiGLU"), (("pos_embed",), "rotary"),
    (("pattern",), "give a layer"), (("embed", 0), "model-level"), (("z", 0, "mlp"), "lives in"),
    (("nonsense", 0), "unknown"), (("pattern", -1), "n_layers"), (("pattern", 1.0), "int"),
])
def test_act_name_errors(args, match):
    with pytest.raises(HookNameError, match=match) as info:
        act_name(*args)
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)


def test_vocabulary_covers_exactly_the_models_hooks(model):
    names = set(model.hook_dict)
    built = {k.suffix for k in MODEL_KINDS} | {act_name(k.kind, i, k.module or None) for k in BLOCK_KINDS
                                               for i in range(CFG["n_layers"])}
    assert names == built
    for name, hp in model.hook_dict.items():
        assert kind_of(name).suffix in name and (hp.layer is None) == (not kind_of(name).block)


def test_hook_table_axes_come_from_the_vocabulary(model):
    for row in model.hook_table(2, 5):
        spec = kind_of(row["name"])
        assert row["axes"] == spec.axes
        assert (row["dtype"] == torch.float32) == (spec.dtype == "float32" or model.dtype == torch.float32)


def test_cache_shorthand_and_recipes_agree(model):
    ids = torch.randint(0, 61, (1, 5), generator=torch.Generator().manual_seed(0))
    _, cache = model.run_with_cache(ids)
    assert torch.equal(cache["scale"], cache["ln_final.hook_scale"])          # bare, as TransformerLens
    assert torch.equal(cache["pattern", 1], cache["blocks.1.attn.hook_pattern"])
    assert torch.equal(cache["pattern", -1], cache["blocks.1.attn.hook_pattern"])
    assert torch.equal(cache["k1"], cache["blocks.1.attn.hook_k"])
    assert ("resid_mid", 0) not in cache
    with pytest.raises(KeyError, match="parallel"):
        cache["resid_mid", 0]
    for k in BLOCK_KINDS:
        name = act_name(k.kind, 0)
        assert hooks.head_axis(name) == head_axis(name) == k.head_axis
        assert hooks.pos_axis(name) == pos_axis(name)
        if k.head_axis is not None:
            assert cache[name].shape[k.head_axis] in (CFG["n_heads"], CFG["n_kv_heads"])
        assert hooks.hook_name(k.kind, 1) == act_name(k.kind, 1)
    assert [n for n, _ in hooks.ablate_heads([(1, 2)], hook="pattern")] == ["blocks.1.attn.hook_pattern"]
    assert [n for n, _ in hooks.steer([0, 1], torch.zeros(32))] == [act_name("resid_pre", i) for i in (0, 1)]
    with pytest.raises(ValueError):
        hooks.ablate_heads([(0, 1)], hook="mlp_out")
