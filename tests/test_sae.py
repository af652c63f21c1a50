"""SAEs in SAELens' folder format: loading (6.x and older configs; ReLU, TopK, JumpReLU), splicing into
the model (error term = bitwise identity), caching feature activations, and the bundled SAE's
recorded reconstruction loss."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import alias_fixture
from workbench.sae import SAE, SAEConfig, bundled_saes
from workbench.sae_train import evaluate_sae

BUNDLED = "command-r-tiny-res-l2"
HOOK = "blocks.2.hook_resid_post"


pytestmark = pytest.mark.usefixtures("one_thread")
model = alias_fixture("bundled_model")


@pytest.fixture(scope="module")
def tokens(model):
    return model.to_tokens(["The capital of France is Paris.", "3 + 4 = 7. The sky is blue."])


@pytest.fixture(scope="module")
def sae():
    return SAE.load_from_disk(BUNDLED)


def random_sae(d_in, d_sae, seed=0, **cfg) -> SAE:
    s = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, **cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in s.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return s


def test_bundled_sae_is_listed_small_and_in_saelens_layout(sae):
    assert BUNDLED in bundled_saes()
    cfg = sae.cfg
    assert (cfg.architecture, cfg.hook_name, cfg.d_in) == ("standard", HOOK, 256)
    assert cfg.metadata["reconstruction"]["explained_variance"] > 0.8


def test_splice_with_error_term_leaves_logits_bitwise_unchanged(model, tokens, sae):
    clean = model(tokens)
    assert torch.equal(model.run_with_saes(tokens, saes=[sae], use_error_term=True), clean)
    names = lambda n: n.startswith(HOOK) or n == "blocks.3.hook_resid_post"
    ref_logits, ref_cache = model.run_with_cache(tokens, names_filter=names)
    logits, cache = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True, names_filter=names)
    assert torch.equal(logits, ref_logits) and torch.equal(cache["resid_post", 3], ref_cache["resid_post", 3])
    acts = cache[HOOK + ".hook_sae_acts_post"]
    assert acts.shape == tokens.shape + (sae.cfg.d_sae,) and (acts >= 0).all() and (acts > 0).any()
    x = cache[HOOK + ".hook_sae_input"]
    assert torch.equal(x, ref_cache[HOOK])
    assert torch.allclose(cache[HOOK + ".hook_sae_recons"] + cache[HOOK + ".hook_sae_error"], x, atol=1e-3)
    assert torch.equal(acts, sae.encode(x))
    assert sae.use_error_term is False and model.acts_to_saes == {}            # restored, detached
    assert HOOK + ".hook_sae_acts_post" not in model.hook_dict


def test_without_error_term_the_model_runs_on_the_reconstruction(model, tokens, sae):
    _, cache = model.run_with_cache(tokens, names_filter=HOOK)
    recons = sae.decode(sae.encode(cache[HOOK]))
    patched = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda x, hook: recons)])
    assert torch.equal(model.run_with_saes(tokens, saes=[sae]), patched)


def test_reload_reproduces_the_recorded_reconstruction_loss(model, sae):
    recorded = sae.cfg.metadata["reconstruction"]
    ids, mask = model.tokenize_batch(sae.cfg.metadata["eval_texts"], True, "right")
    stats = evaluate_sae(model, sae, ids, mask)
    assert stats["eval_positions"] == recorded["eval_positions"]
    for key in ("mse", "explained_variance", "l0", "ce_loss_clean", "ce_loss_with_sae"):
        assert stats[key] == pytest.approx(recorded[key], rel=1e-4), key
    assert stats["ce_loss_clean"] < stats["ce_loss_with_sae"] < stats["ce_loss_clean"] + 1.0


def test_feature_ablation_with_error_term_moves_the_residual_by_its_decoder_row(model, tokens, sae):
    _, clean = model.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True,
                                              names_filter=lambda n: n.startswith(HOOK))
    acts = clean[HOOK + ".hook_sae_acts_post"]
    feature = int(acts[0].sum(0).argmax())

    def ablate(a, hook):
        a = a.clone()
        a[..., feature] = 0
        return a

    with model.saes([sae], use_error_term=True):
        _, ablated = model.run_with_cache(tokens, names_filter=lambda n: n.startswith(HOOK),
                                          fwd_hooks=[(HOOK + ".hook_sae_acts_post", ablate)])
    delta = ablated[HOOK + ".hook_sae_output"] - clean[HOOK + ".hook_sae_output"]
    expected = -acts[..., feature, None] * sae.W_dec[feature]
    assert torch.allclose(delta, expected, atol=1e-3)


def test_gradients_reach_the_features_through_the_error_term_splice(model, tokens, sae):
    grads = {}

    def keep(g, hook):
        grads[hook.name.rsplit(".", 1)[1]] = g.detach().clone()

    with model.saes([sae], use_error_term=True):
        with model.hooks(bwd_hooks=[(HOOK + ".hook_sae_acts_post", keep), (HOOK + ".hook_sae_output", keep)]):
            model(tokens, return_type="loss").backward()
    model.zero_grad(set_to_none=True)
    sae.zero_grad(set_to_none=True)
    assert torch.allclose(grads["hook_sae_acts_post"], grads["hook_sae_output"] @ sae.W_dec.T, atol=1e-6)
    assert grads["hook_sae_acts_post"].abs().sum() > 0


def write_folder(path, cfg: dict, tensors: dict):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))


def weights(d_in, d_sae, seed=0, jump=False):
    g = torch.Generator().manual_seed(seed)
    t = {"W_enc": torch.randn(d_in, d_sae, generator=g) * 0.2, "b_enc": torch.randn(d_sae, generator=g) * 0.1,
         "W_dec": torch.randn(d_sae, d_in, generator=g) * 0.2, "b_dec": torch.randn(d_in, generator=g) * 0.1}
    if jump:
        t["threshold"] = torch.rand(d_sae, generator=g) * 0.3
    return t


def test_saelens_folders_of_each_architecture_and_config_era(tmp_path):
    d_in, d_sae = 16, 40
    x = torch.randn(3, 5, d_in, generator=torch.Generator().manual_seed(1))
    meta = {"model_name": "m", "hook_name": "blocks.1.hook_resid_pre", "hook_head_index": None, "prepend_bos": True,
            "sae_lens_version": "6.5.0"}
    base = {"d_in": d_in, "d_sae": d_sae, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": "none", "reshape_activations": "none", "metadata": meta}
    cases = {
        "relu6": ({**base, "architecture": "standard"}, weights(d_in, d_sae)),
        "topk6": ({**base, "architecture": "topk", "k": 5, "rescale_acts_by_decoder_norm": False}, weights(d_in, d_sae)),
        "jump6": ({**base, "architecture": "jumprelu"}, weights(d_in, d_sae, jump=True)),
        "topk5": ({"d_in": d_in, "d_sae": d_sae, "hook_name": "blocks.1.hook_resid_pre", "hook_layer": 1,
                   "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 5}, "apply_b_dec_to_input": False,
                   "normalize_activations": False, "dtype": "float32", "device": "cpu", "context_size": 128,
                   "finetuning_scaling_factor": False}, weights(d_in, d_sae)),
        "relu_old": ({"d_in": d_in, "d_sae": d_sae, "hook_point": "blocks.1.hook_resid_pre",
                      "normalize_activations": "constant_norm_rescale"}, weights(d_in, d_sae)),
    }
    for name, (cfg, w) in cases.items():
        write_folder(tmp_path / name, cfg, w)
        s = SAE.load_from_disk(tmp_path / name)
        assert s.cfg.hook_name == "blocks.1.hook_resid_pre", name
        xin = x * (d_in ** 0.5 / x.norm(dim=-1, keepdim=True)) if name == "relu_old" else x
        pre = (xin - w["b_dec"] * s.cfg.apply_b_dec_to_input) @ w["W_enc"] + w["b_enc"]
        if s.cfg.architecture == "topk":
            kth = pre.topk(5, dim=-1).values[..., -1:]
            expected = torch.where(pre >= kth, pre.relu(), torch.zeros_like(pre))
        elif s.cfg.architecture == "jumprelu":
            expected = pre.relu() * (pre > w["threshold"])
        else:
            expected = pre.relu()
        acts = s.encode(x)
        assert torch.allclose(acts, expected, atol=1e-5), name
        recons = s.decode(acts)
        raw = expected @ w["W_dec"] + w["b_dec"]
        if name == "relu_old":
            raw = raw / (d_in ** 0.5 / x.norm(dim=-1, keepdim=True))
        assert torch.allclose(recons, raw, atol=1e-4), name
        s.save_model(tmp_path / (name + "_again"))
        again = SAE.load_from_disk(tmp_path / (name + "_again"))
        assert torch.equal(again.encode(x), acts) and again.cfg.architecture == s.cfg.architecture
        written = json.loads((tmp_path / (name + "_again") / "cfg.json").read_text())
        assert written["metadata"]["hook_name"] == "blocks.1.hook_resid_pre" and written["d_sae"] == d_sae


def test_bad_sae_folders_are_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        SAE.load_from_disk(tmp_path / "nothing")
    cfg = {"d_in": 8, "d_sae": 4, "architecture": "gated", "metadata": {"hook_name": "hook_embed"}}
    write_folder(tmp_path / "gated", cfg, weights(8, 4))
    with pytest.raises(ValueError, match="gated"):
        SAE.load_from_disk(tmp_path / "gated")
    cfg["architecture"] = "standard"
    w = weights(8, 4)
    w["W_dec"] = w["W_dec"][:, :7]
    write_folder(tmp_path / "shape", cfg, w)
    with pytest.raises(ValueError, match="W_dec"):
        SAE.load_from_disk(tmp_path / "shape")
    del w["W_dec"]
    write_folder(tmp_path / "missing", cfg, w)
    with pytest.raises(ValueError, match="missing tensors"):
        SAE.load_from_disk(tmp_path / "missing")
    write_folder(tmp_path / "topk", {**cfg, "architecture": "topk"}, weights(8, 4))
    with pytest.raises(ValueError, match="k"):
        SAE.load_from_disk(tmp_path / "topk")


def test_hook_z_and_single_head_saes_splice_at_attention(model, tokens):
    H, d = model.cfg.n_heads, model.cfg.d_head
    z_sae = random_sae(H * d, 32, hook_name="blocks.1.attn.hook_z", reshape_activations="hook_z")
    head_sae = random_sae(d, 16, seed=1, hook_name="blocks.0.attn.hook_z", hook_head_index=2)
    names = lambda n: n.endswith("hook_z") or "hook_sae" in n
    ref_logits, ref = model.run_with_cache(tokens, names_filter=names)
    logits, cache = model.run_with_cache_with_saes(tokens, saes=[z_sae, head_sae], use_error_term=True, names_filter=names)
    assert torch.equal(logits, ref_logits)
    assert cache["blocks.1.attn.hook_z.hook_sae_acts_post"].shape == tokens.shape + (32,)
    assert torch.equal(cache["blocks.0.attn.hook_z.hook_sae_input"], ref["z", 0][..., 2, :])
    _, spliced = model.run_with_cache_with_saes(tokens, saes=[head_sae], names_filter=names)
    z = ref["z", 0]
    other = [h for h in range(H) if h != 2]
    assert torch.equal(spliced["z", 0][..., other, :], z[..., other, :])
    assert torch.allclose(spliced["z", 0][..., 2, :], head_sae.decode(head_sae.encode(z[..., 2, :])), atol=1e-6)


def test_saes_context_cleans_up_and_reset_hooks_keeps_saes(model, tokens, sae):
    with pytest.raises(RuntimeError):
        with model.saes([sae]):
            raise RuntimeError("boom")
    assert model.acts_to_saes == {} and not model.hook_dict[HOOK].has_hooks
    clean = model(tokens)
    model.add_sae(sae)
    try:
        model.reset_hooks()
        assert model.acts_to_saes[HOOK] is sae and not torch.equal(model(tokens), clean)
    finally:
        model.reset_saes()
    assert torch.equal(model(tokens), clean) and HOOK + ".hook_sae_error" not in model.hook_dict
    with pytest.raises(ValueError, match="d_in"):
        model.run_with_saes(tokens, saes=[random_sae(7, 4, hook_name=HOOK)])
    assert model.acts_to_saes == {}
