"""cohere2 (Command R7B / Command A): sliding-window layers with rotary, global layers without."""

import json

import pytest
import torch

from _reference import load_reference, make_hf_checkpoint, reference_residuals
from workbench import CommandRConfig, HookedCommandR

COHERE2 = {
    "pattern4": dict(num_hidden_layers=8, sliding_window=5, sliding_window_pattern=4, logit_scale=0.25,
                     num_attention_heads=4, num_key_value_heads=2),
    "layer_types": dict(num_hidden_layers=4, sliding_window=6, logit_scale=0.25, num_attention_heads=4,
                        num_key_value_heads=1,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]),
}


@pytest.fixture(scope="module", params=list(COHERE2) + ["legacy-r7b-config"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("c2" + request.param)
    if request.param != "legacy-r7b-config":
        return make_hf_checkpoint(path, seed=3, model_type="cohere2", **COHERE2[request.param])
    # the form of the real R7B config.json: sliding_window_pattern instead of layer_types, int theta
    make_hf_checkpoint(path, seed=5, model_type="cohere2", **COHERE2["pattern4"])
    cfg_file = path / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("layer_types")
    cfg.pop("rope_parameters", None)
    cfg.update(sliding_window_pattern=4, rope_theta=50000, rope_scaling=None, torch_dtype="float32",
               order_of_interleaved_layers="local_attn_first", cache_implementation="hybrid")
    cfg_file.write_text(json.dumps(cfg))
    return str(path)


def _ids(batch=2, pos=23):
    return torch.randint(0, 97, (batch, pos), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_explicit_bitwise(checkpoint, dtype):
    ref = load_reference(checkpoint, dtype)
    ours = HookedCommandR.from_pretrained(checkpoint, dtype=dtype)
    assert ours.cfg.model_type == "cohere2"
    assert [ours.cfg.layer_window(i) for i in range(ours.cfg.n_layers)] == \
        [ref.config.sliding_window if t == "sliding_attention" else None for t in ref.config.layer_types]
    ours.attn_impl = "explicit"
    ids = _ids()
    with torch.no_grad():
        ref_logits, ref_resid = reference_residuals(ref, ids)
        logits, cache = ours.run_with_cache(ids, names_filter=lambda n: "resid" in n)
    assert torch.equal(logits, ref_logits), (logits - ref_logits).abs().max()
    for i in range(ours.cfg.n_layers):
        assert torch.equal(cache["resid_pre", i], ref_resid[i])


def test_fused_close(checkpoint):
    ref = load_reference(checkpoint, torch.float32)
    ours = HookedCommandR.from_pretrained(checkpoint)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-5, rtol=0)


def test_hooks_follow_layer_types(checkpoint):
    model = HookedCommandR.from_pretrained(checkpoint)
    cfg = model.cfg
    for i in range(cfg.n_layers):
        rotates = f"blocks.{i}.attn.hook_rot_q" in model.hook_dict
        assert rotates == cfg.layer_is_sliding(i)
        assert f"blocks.{i}.attn.hook_q_normed" not in model.hook_dict
    ids = _ids(1, 17)
    _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    W = cfg.sliding_window
    q = torch.arange(17)[:, None]
    k = torch.arange(17)[None, :]
    for i in range(cfg.n_layers):
        pattern = cache["pattern", i][0]                     # [head q_pos k_pos]
        visible = (k <= q) & ((k > q - W) if cfg.layer_is_sliding(i) else True)
        assert pattern.shape[-2:] == (17, 17), "sliding layers show the full masked matrix"
        assert torch.all(pattern[:, ~visible] == 0)
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:2]))
    rows = model.hook_table(1, 4)
    kinds = {r["layer"]: r["attention"] for r in rows if r["layer"] is not None}
    assert kinds[0].startswith("local (window") and "no rotary" in kinds[cfg.n_layers - 1]


def test_presets_build_on_meta():
    for name in ("command-r7b-12-2024", "command-a-03-2025"):
        cfg = CommandRConfig.from_preset(name)
        model = HookedCommandR.from_config(cfg, device="meta")
        assert cfg.logit_scale == 0.25 and not cfg.use_qk_norm
        assert [cfg.layer_is_sliding(i) for i in range(4)] == [True, True, True, False]
        assert "blocks.3.attn.hook_rot_q" not in model.hook_dict and "blocks.0.attn.hook_rot_q" in model.hook_dict


def test_legacy_pattern_and_layer_types_agree():
    base = dict(model_type="cohere2", vocab_size=10, hidden_size=16, num_hidden_layers=8,
                num_attention_heads=2, intermediate_size=8, sliding_window=4)
    a = CommandRConfig.from_dict({**base, "sliding_window_pattern": 4})
    b = CommandRConfig.from_dict({**base, "layer_types": a.layer_types})
    assert a.layer_types == b.layer_types and a.layer_types[3] == "full_attention"
