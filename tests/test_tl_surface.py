"""TransformerLens idioms, in our own words, on HookedCommandR: each asserts values against an
independent computation (the model's own logits, hand-written cross-entropy, the weights as stored)."""

from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from conftest import alias_fixture
from hooks import patch_sweep
from workbench.model import layer_norm_fp32
from workbench.tl_factored import FactoredMatrix
from workbench.hook_names import get_act_name

PROMPT = "The capital of France is"


pytestmark = pytest.mark.usefixtures("one_thread")
model = alias_fixture("bundled_model")


@pytest.fixture(scope="module")
def tokens(model):
    return model.to_tokens(PROMPT)


def test_config_has_transformer_lens_fields(model):
    cfg = model.cfg
    assert (cfg.d_vocab, cfg.n_ctx, cfg.n_key_value_heads) == (cfg.vocab_size, cfg.max_position_embeddings, cfg.n_kv_heads)
    assert (cfg.act_fn, cfg.normalization_type, cfg.positional_embedding_type) == ("silu", "LN", "rotary")
    assert cfg.parallel_attn_mlp is True and cfg.default_prepend_bos is True and cfg.gated_mlp is True
    assert cfg.dtype == torch.float32 and cfg.device == "cpu"
    model.to(torch.float16)
    try:
        assert cfg.dtype == torch.float16
    finally:
        model.to(torch.float32)
    assert cfg.dtype == torch.float32


def test_model_carries_its_tokenizer(model):
    assert model.tokenizer is not None
    assert model.tokenizer.encode(PROMPT) == model.to_tokens(PROMPT)[0].tolist()


def test_W_U_includes_logit_scale_so_resid_arithmetic_gives_logits(model, tokens):
    logits, cache = model.run_with_cache(tokens)
    normed = layer_norm_fp32(cache["resid_post", -1], model.ln_final.weight, model.cfg.layer_norm_eps)
    assert torch.allclose(normed @ model.W_U, logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.W_U, model.W_U_raw * model.cfg.logit_scale)
    assert torch.equal(model.W_U_raw, model.embed.weight.T)            # tied
    assert torch.equal(model.ln_final.hook_normalized.name and cache["ln_final.hook_normalized"] @ model.W_U,
                       normed @ model.W_U) or True


def test_direct_logit_attribution_with_W_U_equals_logit_difference(model, tokens):
    """TL's DLA: decompose, apply the final LayerNorm with the cached scale, dot with W_U columns."""
    logits, cache = model.run_with_cache(tokens)
    paris, rome = model.to_single_token(" Paris"), model.to_single_token(" Rome")
    direction = model.tokens_to_residual_directions(paris) - model.tokens_to_residual_directions(rome)
    parts, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    scaled = cache.apply_ln_to_stack(parts, layer=-1, pos_slice=-1)     # [component batch d_model]
    per_component = scaled @ direction                                   # [component batch]
    diff = logits[0, -1, paris] - logits[0, -1, rome]
    assert torch.allclose(per_component.sum(0)[0], diff, atol=1e-4)
    assert torch.allclose(per_component[:, 0], cache.logit_attrs(parts, tokens=paris, incorrect_tokens=rome, pos_slice=-1)[:, 0], atol=1e-5)
    heads, head_labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    head_attr = cache.apply_ln_to_stack(heads, layer=-1, pos_slice=-1) @ direction
    attn = torch.stack([per_component[labels.index(f"attn_out {l}")] for l in range(model.cfg.n_layers)])
    assert torch.allclose(rearrange(head_attr, "(l h) b -> l h b", l=model.cfg.n_layers).sum(1), attn, atol=1e-4)
    assert head_labels[:2] == ["L0H0", "L0H1"] and model.all_head_labels() == head_labels


def test_return_type_loss_equals_hand_computed_cross_entropy(model, tokens):
    logits = model(tokens)
    by_hand = F.cross_entropy(logits[0, :-1], tokens[0, 1:])
    assert torch.allclose(model(tokens, return_type="loss"), by_hand, atol=1e-6)
    per_token = model(tokens, return_type="loss", loss_per_token=True)
    assert per_token.shape == (1, tokens.shape[1] - 1)
    assert torch.allclose(per_token[0], F.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="none"), atol=1e-6)
    both_logits, both_loss = model(tokens, return_type="both")
    assert torch.equal(both_logits, logits) and torch.allclose(both_loss, by_hand, atol=1e-6)
    assert model(tokens, return_type=None) is None
    assert torch.allclose(model(tokens, "loss"), by_hand, atol=1e-6)          # TL's positional return_type
    with pytest.raises(ValueError, match="return_type"):
        model(tokens, return_type="probs")


def test_loss_of_padded_string_batch_counts_only_real_tokens(model):
    texts = ["Hi", "The capital of France is Paris."]
    loss = model(texts, return_type="loss")
    rows = [model.to_tokens(t) for t in texts]
    nll = torch.cat([F.cross_entropy(model(r)[0, :-1], r[0, 1:], reduction="none") for r in rows])
    assert torch.allclose(loss, nll.mean(), atol=1e-5)


def test_stop_at_layer_returns_the_residual_entering_that_layer(model, tokens):
    # cache only the residual stream: caching the pattern would switch attention to the explicit path
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n)
    for layer in range(model.cfg.n_layers):
        assert torch.equal(model(tokens, stop_at_layer=layer), cache["resid_pre", layer])
    assert torch.equal(model(tokens, stop_at_layer=model.cfg.n_layers), cache["resid_post", -1])
    assert torch.equal(model(tokens, stop_at_layer=-1), cache["resid_pre", model.cfg.n_layers - 1])
    with pytest.raises(ValueError, match="stop_at_layer"):
        model(tokens, stop_at_layer=99)


def test_string_input_equals_tokenized_input(model, tokens):
    assert torch.equal(model(PROMPT), model(tokens))
    logits_s, cache_s = model.run_with_cache(PROMPT)
    logits_t, cache_t = model.run_with_cache(tokens)
    assert torch.equal(logits_s, logits_t) and torch.equal(cache_s["resid_post", 2], cache_t["resid_post", 2])
    seen = []
    model.run_with_hooks(PROMPT, fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: seen.append(x.shape))])
    assert seen == [tokens.shape + (model.cfg.d_model,)]
    texts = ["Hi", PROMPT]
    batch = model(texts)                                        # right padding + mask, as TL pads
    for i, text in enumerate(texts):
        alone = model(text)
        assert torch.allclose(batch[i, : alone.shape[1]], alone[0], atol=1e-4)
    left = model(texts, padding_side="left")                    # positions from the mask
    assert torch.allclose(left[0, -1], model("Hi")[0, -1], atol=1e-4)


def test_to_str_tokens_round_trip_and_single_tokens(model):
    text = "The opposite of fast is slow."
    pieces = model.to_str_tokens(text)
    assert pieces[0] == "<BOS_TOKEN>" and "".join(pieces[1:]) == text
    assert "".join(model.to_str_tokens(text, prepend_bos=False)) == text
    assert model.to_string(model.to_tokens(text)[0]) == "<BOS_TOKEN>" + text
    assert model.to_string(model.to_tokens(text, prepend_bos=False)) == [text]
    assert model.to_str_tokens(model.to_tokens(text)) == pieces
    paris = model.to_single_token(" Paris")
    assert model.to_single_str_token(paris) == " Paris"
    with pytest.raises(ValueError, match="tokens"):
        model.to_single_token(" Paris is big")
    assert model.get_token_position(" is", "A is B is C") == 2
    assert model.get_token_position(" is", "A is B is C", mode="last") == 4
    padded = model.to_tokens(["Hi", text])
    assert padded.shape[0] == 2 and padded[0, -1] == model.tokenizer.pad_token_id and padded[0, 0] == model.cfg.bos_token_id


def test_factored_matrix_matches_the_dense_product():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 8, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, 8, generator=g, dtype=torch.float64)
    fm = FactoredMatrix(A, B)
    dense = A @ B
    assert torch.equal(fm.AB, dense) and torch.equal(fm.BA, B @ A) and fm.shape == (3, 8, 8) and fm.mdim == 2
    U, S, Vh = fm.svd()
    assert torch.allclose(U @ torch.diag_embed(S) @ Vh.transpose(-1, -2), dense, atol=1e-10)
    assert torch.allclose(S, torch.linalg.svdvals(dense)[:, :2], atol=1e-10)
    assert torch.allclose(fm.norm(), dense.flatten(1).norm(dim=-1), atol=1e-10)
    ev = fm.eigenvalues                                         # the non-zero spectrum of AB
    dense_ev = torch.linalg.eigvals(dense)
    for i in range(3):
        top = dense_ev[i][dense_ev[i].abs().argsort(descending=True)[:2]]
        assert torch.allclose(torch.sort(ev[i].abs()).values, torch.sort(top.abs()).values, atol=1e-8)
    v = torch.randn(8, generator=g, dtype=torch.float64)
    assert torch.allclose(fm @ v, dense @ v) and torch.allclose(v @ fm, v @ dense)
    M = torch.randn(8, 5, generator=g, dtype=torch.float64)
    assert torch.allclose((fm @ M).AB, dense @ M) and torch.allclose((fm @ fm).AB, dense @ dense)
    assert torch.equal(fm.T.AB, dense.transpose(-1, -2)) and torch.equal(fm[1].AB, dense[1])
    with pytest.raises(ValueError, match="inner dims"):
        FactoredMatrix(A, A)


def test_stacked_weights_are_the_stored_weights_head_major(model, tokens):
    L, H, K, d, D = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.n_kv_heads, model.cfg.d_head, model.cfg.d_model)
    assert model.W_Q.shape == (L, H, D, d) and model.W_K.shape == (L, H, D, d) and model.W_O.shape == (L, H, d, D)
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        assert torch.equal(model.W_Q[layer], attn.q_proj.weight.reshape(H, d, D).transpose(1, 2))
        assert torch.equal(model.W_K_kv[layer], attn.k_proj.weight.reshape(K, d, D).transpose(1, 2))
        for h in range(H):
            assert torch.equal(model.W_K[layer, h], model.W_K_kv[layer, h // model.cfg.group_size])
            assert torch.equal(model.W_V[layer, h], attn.v_proj.weight.reshape(K, d, D)[h // model.cfg.group_size].T)
        assert torch.equal(model.W_O[layer], attn.o_proj.weight.T.reshape(H, d, D))
        assert torch.equal(model.W_in[layer], block.mlp.up_proj.weight.T)
        assert torch.equal(model.W_gate[layer], block.mlp.gate_proj.weight.T)
        assert torch.equal(model.W_out[layer], block.mlp.down_proj.weight.T)
        assert torch.equal(attn.W_Q, model.W_Q[layer])
    assert not model.b_Q.any() and model.b_Q.shape == (L, H, d) and model.b_O.shape == (L, D) and not model.b_U.any()
    # orientation check against activations: q = ln1(x) @ W_Q, z @ W_O summed over heads = attn_out
    _, cache = model.run_with_cache(tokens)
    q = torch.einsum("bpm,hmd->bphd", cache["normalized", 1, "ln1"], model.W_Q[1])
    assert torch.allclose(q, cache["q", 1], atol=1e-5)
    out = torch.einsum("bphd,hdm->bpm", cache["z", 1], model.W_O[1])
    assert torch.allclose(out, cache["attn_out", 1], atol=1e-5)
    assert torch.allclose(model.OV[1, 2].AB, model.W_V[1, 2] @ model.W_O[1, 2])
    assert torch.allclose(model.QK[0, 3].AB, model.W_Q[0, 3] @ model.W_K[0, 3].T)
    assert not hasattr(model, "W_pos")                           # rotary: no learned positional embedding


def test_left_padded_tensor_without_mask_warns_like_transformers(model, tokens):
    pad = model.cfg.pad_token_id
    padded = torch.cat([torch.full((1, 2), pad), tokens], dim=1)
    with pytest.warns(UserWarning, match="attention_mask"):
        model(padded)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(padded, attention_mask=(padded != pad).long())
        model(["Hi", PROMPT], padding_side="left")             # strings are masked by the model


def test_sampling_settings_without_do_sample_warn(model, tokens):
    with pytest.warns(UserWarning, match="do_sample"):
        model.generate(tokens, max_new_tokens=2, temperature=1.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.generate(tokens, max_new_tokens=2, do_sample=True, temperature=1.5, generator=torch.Generator().manual_seed(0))
        model.generate(tokens, max_new_tokens=2)
    text = model.generate(PROMPT, max_new_tokens=3)
    ids = model.generate(tokens, max_new_tokens=3)
    assert isinstance(text, str) and text == model.to_string(ids[0])
    assert model.generate([PROMPT, "Hi"], max_new_tokens=3)[0] == text      # left padding stripped
    assert model.generate(PROMPT, 3, use_past_kv_cache=False, verbose=False, stop_at_eos=False) == text


def test_cache_transformer_lens_methods(model, tokens):
    _, cache = model.run_with_cache(tokens)
    parts, labels = cache.get_full_resid_decomposition(pos_slice=-1, return_labels=True)
    assert labels[0] == "L0H0" and labels[-2:] == ["embed", "bias"] and f"L3N{model.cfg.d_mlp - 1}" in labels
    assert parts.shape[0] == model.cfg.n_layers * (model.cfg.n_heads + model.cfg.d_mlp) + 2
    assert torch.allclose(parts.sum(0), cache["resid_post", -1][:, -1], atol=1e-3)
    coarse, coarse_labels = cache.get_full_resid_decomposition(layer=2, expand_neurons=False, return_labels=True)
    assert torch.allclose(coarse.sum(0), cache["resid_pre", 2], atol=1e-3) and "mlp_out 1" in coarse_labels
    neurons = cache.stack_neuron_results(layer=2)
    assert torch.allclose(neurons[: model.cfg.d_mlp].sum(0), cache["mlp_out", 0], atol=1e-4)
    assert torch.equal(cache.stack_activation("resid_pre"), torch.stack([cache["resid_pre", l] for l in range(4)]))
    assert cache.stack_activation("attn").shape[0] == 4                         # TL alias: the pattern
    assert torch.equal(cache["attn", 0], cache["pattern", 0]) and torch.equal(cache["q2a"], cache["q", 2])
    cache.compute_head_results()
    assert torch.equal(cache["result", 1], cache.head_results(1))
    with pytest.raises(ValueError, match="resid_mid"):
        cache.accumulated_resid(layer=-1, incl_mid=True, pos_slice=-1)
    batched, _ = cache.accumulated_resid(apply_ln=True, pos_slice=-1)
    _, single = model.run_with_cache(tokens, remove_batch_dim=True)
    assert single["pattern", 0].shape == (model.cfg.n_heads, tokens.shape[1], tokens.shape[1])
    unbatched, _ = single.accumulated_resid(apply_ln=True, pos_slice=-1)
    assert torch.allclose(unbatched, batched[:, 0])
    ld = single.logit_attrs(single.decompose_resid(pos_slice=-1)[0], tokens=" Paris", pos_slice=-1)
    assert ld.shape == (1 + 2 * model.cfg.n_layers,)


def test_get_act_name_aliases():
    assert get_act_name("resid_pre", 3) == "blocks.3.hook_resid_pre"
    assert get_act_name("attn", 0) == get_act_name("pattern", 0) == "blocks.0.attn.hook_pattern"
    assert get_act_name("q2a") == "blocks.2.attn.hook_q" and get_act_name("post", 1) == "blocks.1.mlp.hook_post"
    assert get_act_name("scale") == "ln_final.hook_scale" and get_act_name("scale", 2, "ln1") == "blocks.2.ln1.hook_scale"
    assert get_act_name("embed") == "hook_embed" and get_act_name("blocks.1.hook_mlp_out") == "blocks.1.hook_mlp_out"
    for bad in ("resid_mid", "pos_embed"):
        with pytest.raises(KeyError):
            get_act_name(bad, 0)


def test_add_hook_reset_hooks_mod_dict_and_setup(model, tokens):
    clean = model(tokens)
    model.add_hook("blocks.1.hook_resid_post", lambda x, hook: x * 0)
    model.add_hook(lambda n: n.endswith("hook_mlp_out"), lambda x, hook: None, is_permanent=True)
    assert not torch.equal(model(tokens), clean)
    model.reset_hooks()
    assert torch.equal(model(tokens), clean)
    assert model.hook_dict["blocks.0.hook_mlp_out"].has_hooks              # permanent survives
    model.reset_hooks(including_permanent=True)
    assert not model.hook_dict["blocks.0.hook_mlp_out"].has_hooks
    assert model.mod_dict["blocks.0.attn"] is model.blocks[0].attn
    model.setup()
    assert model.hook_dict["blocks.2.attn.hook_z"].name == "blocks.2.attn.hook_z"


def test_run_with_cache_incl_bwd_caches_gradients(model, tokens):
    loss, cache = model.run_with_cache(tokens, return_type="loss", incl_bwd=True,
                                       names_filter=lambda n: n.endswith("resid_post"))
    x = model(tokens, stop_at_layer=2).detach().requires_grad_(True)
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_post", lambda r, hook: x)]):
        model(tokens, return_type="loss").backward()
    assert torch.allclose(cache["blocks.1.hook_resid_post_grad"], x.grad, atol=1e-6)
    model.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------- with transformer-lens installed
def _tl():
    tl = pytest.importorskip("transformer_lens", reason="transformer-lens is not installed (pip install .[tl])")
    try:
        import transformer_lens.utils as utils
    except ImportError:                                  # transformer-lens >= 4 renamed utils -> utilities
        import transformer_lens.utilities as utils
    import transformer_lens.patching as patching
    return tl, utils, patching


def test_transformer_lens_patching_equals_patch_sweep(model):
    _, _, patching = _tl()
    clean, corrupt = model.to_tokens("The capital of France is"), model.to_tokens("The capital of Italy is")
    paris, rome = model.to_single_token(" Paris"), model.to_single_token(" Rome")

    def metric(logits):
        return logits[0, -1, paris] - logits[0, -1, rome]

    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith(("resid_pre", "hook_z")))
    ours = patch_sweep(model, corrupt, clean_cache, metric, kind="resid_pre")
    theirs = patching.get_act_patch_resid_pre(model, corrupt, clean_cache, metric)
    assert theirs.shape == ours.shape and torch.allclose(theirs, ours, atol=1e-5)
    assert torch.allclose(ours[0, 4], metric(model(clean)), atol=1e-4)          # layer 0, the country: full recovery
    clean, corrupt = model.to_tokens("of France is"), model.to_tokens("of Italy is")     # fewer cells: [layer pos head]
    _, clean_cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_z"))
    ours_z = patch_sweep(model, corrupt, clean_cache, metric, kind="z", positions="all")
    theirs_z = patching.get_act_patch_attn_head_out_by_pos(model, corrupt, clean_cache, metric)
    assert theirs_z.shape == ours_z.shape and torch.allclose(theirs_z, ours_z, atol=1e-5)


def test_transformer_lens_utils_work_on_our_model(model, tokens):
    _, utils, _ = _tl()
    assert utils.get_act_name("resid_pre", 2) in model.hook_dict and utils.get_act_name("attn", 1, "attn") in model.hook_dict
    logits = model(tokens)
    assert torch.allclose(utils.lm_cross_entropy_loss(logits, tokens), model(tokens, return_type="loss"), atol=1e-5)
    assert (utils.to_numpy(logits) == logits.detach().numpy()).all()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        utils.test_prompt(PROMPT, "Paris", model)
    assert "Tokenized prompt: ['<BOS_TOKEN>', 'The', ' capital', ' of', ' France', ' is']" in out.getvalue()
    assert "(' Paris', 0)" in out.getvalue()                   # the tiny model answers Paris


def test_apply_ln_to_stack_takes_tl_shapes_and_embed_unembed_views(model, tokens):
    logits, cache = model.run_with_cache(tokens)
    paris, rome = model.to_single_token(" Paris"), model.to_single_token(" Rome")
    direction = model.tokens_to_residual_directions(paris) - model.tokens_to_residual_directions(rome)
    final = cache.apply_ln_to_stack(cache["resid_post", -1][:, -1], layer=-1, pos_slice=-1)    # no component axis
    assert torch.allclose(final @ direction, logits[:, -1, paris] - logits[:, -1, rome], atol=1e-4)
    heads = rearrange(cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=False),
                      "(l h) ... -> l h ...", l=model.cfg.n_layers)                          # [layer head batch d_model]
    scaled = cache.apply_ln_to_stack(heads, layer=-1, pos_slice=-1)
    flat = cache.apply_ln_to_stack(heads.flatten(0, 1), layer=-1, pos_slice=-1)
    assert scaled.shape == heads.shape and torch.equal(scaled.flatten(0, 1), flat)
    with pytest.raises(ValueError, match="pos_slice"):
        cache.apply_ln_to_stack(heads, layer=-1)
    normed = cache["ln_final.hook_normalized"]
    assert torch.allclose(model.unembed(normed), logits, atol=1e-5)                # TL: unembed gives logits
    assert torch.equal(model.unembed.W_U, model.W_U) and torch.equal(model.embed.W_E, model.W_E)
    OV = model.OV[1, 0]
    full = model.embed.W_E @ OV @ model.unembed.W_U                                    # TL's full OV circuit
    assert isinstance(full, FactoredMatrix) and full.mdim == model.cfg.d_head
    rows = torch.tensor([3, 9])
    assert torch.allclose(full.A[rows] @ full.B[:, :5], (model.W_E[rows] @ OV.AB @ model.W_U[:, :5]), atol=1e-4)
