"""workbench.analysis and the ActivationCache residual views: numbers checked against independent
formulas, exact identities (lens of the last residual == hook_logits, DLA sums to the logit) and
hand-built attention patterns with known head scores."""

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import jittered_model
from workbench import ActivationCache
from workbench.analysis import (direct_logit_attribution, duplicate_token_scores, induction_scores, lens_logits,
                                logit_lens, previous_occurrence, previous_token_scores, repeated_random_tokens)

CFG = dict(vocab_size=97, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=80, use_qk_norm=True,
           logit_scale=0.37, layer_norm_eps=1e-5)
L, H, D = 3, 4, 48


@pytest.fixture(scope="module")
def model():
    return jittered_model(CFG, seed=3, norm_seed=4, scale=0.4)   # non-unit LayerNorm weights, so skipping them shows


@pytest.fixture(scope="module")
def run(model):
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
    return ids, logits, cache


def reference_lens(model, resid):
    """Independent logit lens in float64: F.layer_norm with ln_final's weight, W_U, logit_scale."""
    x = resid.double()
    w = model.ln_final.weight.double()
    normed = F.layer_norm(x, (D,), weight=w, eps=model.cfg.layer_norm_eps)
    return normed @ model.unembed.weight.double().T * model.cfg.logit_scale


# ---------------------------------------------------------------------------------------- logit lens
def test_lens_of_final_residual_is_hook_logits(model, run):
    _, logits, cache = run
    got = lens_logits(model, cache["resid_post", -1])
    assert torch.equal(got, cache["logits"])
    assert (got - logits).abs().max() <= 1e-5
    stack, labels = cache.accumulated_resid()
    assert labels == ["resid_pre 0", "resid_pre 1", "resid_pre 2", "resid_post 2"]
    torch.testing.assert_close(lens_logits(model, stack)[-1], logits, rtol=0, atol=1e-5)


def test_lens_uses_each_residuals_own_norm_and_logit_scale(model, run):
    ids, logits, cache = run
    lens = logit_lens(model, cache, top_k=4, target=ids)
    assert lens.labels[-1] == "resid_post 2" and lens.top_ids.shape == (4, 2, 8, 4)
    stack, _ = cache.accumulated_resid()
    for i in range(4):
        ref = reference_lens(model, stack[i])                              # [batch pos vocab]
        torch.testing.assert_close(lens_logits(model, stack[i]).double(), ref, rtol=1e-5, atol=1e-6)
        probs = ref.softmax(-1)
        p, top = probs.topk(4, dim=-1)
        assert torch.equal(lens.top_ids[i], top)
        torch.testing.assert_close(lens.top_probs[i].double(), p, rtol=1e-5, atol=1e-7)
        t_prob = probs.gather(-1, ids[..., None])[..., 0]
        torch.testing.assert_close(lens.target_prob[i].double(), t_prob, rtol=1e-5, atol=1e-7)
        # rank = position of the target in the sorted distribution
        order = ref.argsort(-1, descending=True)
        rank = (order == ids[..., None]).float().argmax(-1)
        assert torch.equal(lens.target_rank[i], rank)
    # the embedding row and the final row differ (the lens is not a constant)
    assert not torch.equal(lens.top_ids[0], lens.top_ids[-1])


def test_lens_from_ids_positions_and_targets(model, run):
    ids, _, cache = run
    full = logit_lens(model, cache, top_k=3, target=7)
    from_ids = logit_lens(model, ids, top_k=3, target=7)
    assert torch.equal(full.top_ids, from_ids.top_ids) and torch.equal(full.target_rank, from_ids.target_rank)
    last = logit_lens(model, ids, top_k=3, target=torch.tensor([7, 9]), positions=[-1])
    assert last.top_ids.shape == (4, 2, 1, 3) and last.positions.tolist() == [7]
    assert torch.equal(last.top_ids[:, :, 0], full.top_ids[:, :, 7])
    assert torch.equal(last.target_rank[:, 0, 0], full.target_rank[:, 0, 7])
    sliced = logit_lens(model, ids, target=ids, positions=slice(2, 5))      # target given for every position
    assert torch.equal(sliced.target_ids, ids[:, 2:5])
    with pytest.raises(ValueError, match="target"):
        logit_lens(model, ids, target=torch.zeros(3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="target"):
        logit_lens(model, ids, target=97)
    with pytest.raises(ValueError, match="d_model"):
        lens_logits(model, torch.zeros(2, 5))


def test_lens_and_dla_under_accelerate_offload(model, run):
    accelerate = pytest.importorskip("accelerate")
    ids, logits, _ = run
    off = copy.deepcopy(model)
    accelerate.cpu_offload(off, execution_device="cpu")
    assert off.unembed.weight.device.type == "meta"            # weights live in the offload map
    names = lambda n: "hook_result" not in n                   # noqa: E731
    with torch.no_grad():
        off_logits, off_cache = off.run_with_cache(ids, names_filter=names)
        _, ref_cache = model.run_with_cache(ids, names_filter=names)
    assert torch.equal(lens_logits(off, off_cache["resid_post", -1]), off_logits)
    assert torch.equal(logit_lens(off, off_cache).top_probs, logit_lens(model, ref_cache).top_probs)
    assert torch.equal(direct_logit_attribution(off, off_cache, 5).values,
                       direct_logit_attribution(model, ref_cache, 5).values)


# ---------------------------------------------------------------------------------------- DLA
@pytest.mark.parametrize("wrong", [None, 11])
def test_dla_components_sum_to_the_logit(model, run, wrong):
    ids, logits, cache = run
    answer = torch.tensor([3, 40])
    dla = direct_logit_attribution(model, cache, answer, wrong=wrong)
    want = logits[[0, 1], -1, answer] - (logits[:, -1, wrong] if wrong is not None else 0)
    assert len(dla.labels) == 1 + L * (H + 1) == dla.values.shape[0]
    assert dla.labels[:2] == ["embed", "L0H0"] and dla.labels[H + 1] == "mlp 0"
    assert (dla.total - want).abs().max() <= 1e-4
    assert (dla.logit - want).abs().max() == 0
    # each part is real: no single component carries the logit, heads differ from each other
    assert dla.values.abs().max() < dla.values.abs().sum(0).max()
    assert dla.heads.std() > 0 and dla.mlp.abs().min() > 0
    # from input ids (hook_z path) == from a full cache (hook_result path)
    again = direct_logit_attribution(model, ids, answer, wrong=wrong)
    torch.testing.assert_close(again.values, dla.values, rtol=1e-5, atol=1e-6)


def test_dla_layer_heads_add_up_to_attn_out(model, run):
    _, _, cache = run
    parts, labels = cache.decompose_resid(pos_slice=-1)
    attrs = cache.logit_attrs(parts, tokens=5, incorrect_tokens=6, pos_slice=-1)      # [component batch]
    dla = direct_logit_attribution(model, cache, 5, wrong=6)
    for layer in range(L):
        torch.testing.assert_close(dla.heads[layer].sum(0), attrs[labels.index(f"attn_out {layer}")],
                                   rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dla.mlp[layer], attrs[labels.index(f"mlp_out {layer}")], rtol=1e-6, atol=1e-7)
    # independent formula for the embedding: frozen scale, centred, weight, W_U difference, logit_scale
    e = cache["embed"][:, -1].double()
    centred = e - e.mean(-1, keepdim=True)
    u = (model.unembed.weight[5] - model.unembed.weight[6]).double()
    by_hand = (centred / cache["ln_final.hook_scale"][:, -1].double() * model.ln_final.weight.double()) @ u
    torch.testing.assert_close(dla.embed.double(), by_hand * model.cfg.logit_scale, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------- cache views
def test_decompose_resid_sums_bitwise_and_ln(model, run):
    _, _, cache = run
    parts, labels = cache.decompose_resid()
    assert labels == ["embed", "attn_out 0", "mlp_out 0", "attn_out 1", "mlp_out 1", "attn_out 2", "mlp_out 2"]
    acc = parts[0]
    for p in parts[1:]:
        acc = acc + p
    assert torch.equal(acc, cache["resid_post", -1])
    upto, _ = cache.decompose_resid(layer=2)
    acc = upto[0]
    for p in upto[1:]:
        acc = acc + p
    assert torch.equal(acc, cache["resid_pre", 2])
    normed = cache.decompose_resid(apply_ln=True, return_labels=False)
    torch.testing.assert_close(normed.sum(0), cache["ln_final.hook_normalized"], rtol=1e-5, atol=1e-5)
    normed1 = cache.decompose_resid(layer=1, apply_ln=True, return_labels=False)    # block 1's ln1
    torch.testing.assert_close(normed1.sum(0), cache["normalized", 1], rtol=1e-5, atol=1e-5)
    attn_only, labels = cache.decompose_resid(mode="attn", incl_embeds=False, pos_slice=[0, 3])
    assert labels == ["attn_out 0", "attn_out 1", "attn_out 2"] and attn_only.shape == (3, 2, 2, D)
    assert torch.equal(attn_only[1], cache["attn_out", 1][:, [0, 3]])


def test_accumulated_resid(model, run):
    _, _, cache = run
    stack, labels = cache.accumulated_resid(layer=1)
    assert labels == ["resid_pre 0", "resid_pre 1"]
    assert torch.equal(stack[1], cache["resid_pre", 1])
    no_final = cache.accumulated_resid(incl_final=False, return_labels=False, pos_slice=-1)
    assert no_final.shape == (L, 2, D) and torch.equal(no_final[2], cache["resid_pre", 2][:, -1])
    normed, _ = cache.accumulated_resid(apply_ln=True)
    assert torch.equal(normed[-1], cache["ln_final.hook_normalized"])    # each residual's own statistics
    w = model.ln_final.weight
    torch.testing.assert_close(normed[0], F.layer_norm(cache["resid_pre", 0], (D,), weight=w, eps=1e-5),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layer"):
        cache.accumulated_resid(layer=7)


def test_stack_head_results_from_z_equals_hook_result(model, run):
    _, _, cache = run
    heads, labels = cache.stack_head_results()
    assert heads.shape == (L * H, 2, 8, D) and labels[:5] == ["L0H0", "L0H1", "L0H2", "L0H3", "L1H0"]
    assert torch.equal(heads[H + 2], cache["result", 1][:, :, 2])
    no_result = ActivationCache({k: v for k, v in cache.items() if "hook_result" not in k}, model)
    from_z, _ = no_result.stack_head_results()
    assert torch.equal(from_z, heads)
    torch.testing.assert_close(heads[:H].sum(0), cache["attn_out", 0], rtol=1e-5, atol=1e-6)
    last = no_result.stack_head_results(layer=2, pos_slice=-1, return_labels=False)
    assert last.shape == (2 * H, 2, D)
    bare = ActivationCache({k: v for k, v in no_result.items() if "hook_z" not in k}, model)
    with pytest.raises(KeyError, match="hook_z"):
        bare.stack_head_results()


# ---------------------------------------------------------------------------------------- head scores
def test_repeated_random_tokens():
    t = repeated_random_tokens(50, seq_len=10, n_seqs=6, seed=1, bos_token_id=5, low=2, high=40)
    assert t.shape == (6, 21) and (t[:, 0] == 5).all()
    assert torch.equal(t[:, 1:11], t[:, 11:])
    half = t[:, 1:11]
    assert ((half >= 2) & (half < 40) & (half != 5)).all()
    assert all(len(set(row.tolist())) == 10 for row in half)              # distinct within a repeat
    assert torch.equal(t, repeated_random_tokens(50, seq_len=10, n_seqs=6, seed=1, bos_token_id=5, low=2, high=40))
    assert not torch.equal(t, repeated_random_tokens(50, seq_len=10, n_seqs=6, seed=2, bos_token_id=5, low=2, high=40))
    assert repeated_random_tokens(50, seq_len=4, n_seqs=2).shape == (2, 8)
    with pytest.raises(ValueError, match="low/high"):
        repeated_random_tokens(50, low=10, high=60)


def hand_patterns(tokens):
    """Known attention patterns [batch head q k] per layer and the head scores they must give."""
    b, T = tokens.shape
    q = torch.arange(T)
    prev = previous_occurrence(tokens)                                       # [batch pos]
    causal = (q[None, :] <= q[:, None]).float()
    uniform = (causal / causal.sum(-1, keepdim=True)).expand(b, T, T)

    def one_hot(idx):                                                        # idx [batch pos] -> [batch q k]
        return F.one_hot(idx, T).float()

    self_ = one_hot(q.expand(b, T))
    previous = one_hot((q - 1).clamp(min=0).expand(b, T))
    first = one_hot(torch.zeros(b, T, dtype=torch.long))
    duplicate = one_hot(torch.where(prev >= 0, prev, q))
    induction = one_hot(torch.where(prev >= 0, prev + 1, q))
    layers = [torch.stack([previous, uniform, first, self_], 1),
              torch.stack([induction, duplicate, uniform, self_], 1),
              torch.stack([uniform, uniform, induction, previous], 1)]
    return layers


def expected_scores(tokens, kind):
    """The same scores by plain loops over the hand-built patterns (no shared code path)."""
    layers = hand_patterns(tokens)
    b, T = tokens.shape
    out = torch.zeros(L, H, dtype=torch.float64)
    for li, pat in enumerate(layers):
        for h in range(H):
            vals = []
            for bi in range(b):
                row = tokens[bi].tolist()
                for qi in range(T):
                    earlier = [p for p in range(qi) if row[p] == row[qi]]
                    if kind == "previous":
                        if qi >= 1:
                            vals.append(pat[bi, h, qi, qi - 1].item())
                    elif earlier:
                        key = earlier[-1] + (1 if kind == "induction" else 0)
                        vals.append(pat[bi, h, qi, key].item())
            out[li, h] = sum(vals) / len(vals)
    return out


def test_head_scores_on_hand_built_patterns(model):
    tokens = repeated_random_tokens(model, seq_len=6, n_seqs=3, seed=0, bos_token_id=1)
    layers = hand_patterns(tokens)

    def overwrite(pattern, hook):
        return layers[hook.layer].to(pattern.dtype)

    fwd = [(f"blocks.{i}.attn.hook_pattern", overwrite) for i in range(L)]
    with model.hooks(fwd_hooks=fwd):
        prev = previous_token_scores(model, tokens)
        ind = induction_scores(model, tokens)
        dup = duplicate_token_scores(model, tokens)
    for got, kind in ((prev, "previous"), (ind, "induction"), (dup, "duplicate")):
        assert got.shape == (L, H) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected_scores(tokens, kind), rtol=1e-6, atol=1e-7)
    # the one-hot heads score exactly 1 (and 0 where they look elsewhere)
    assert prev[0, 0] == 1 and prev[0, 3] == 0 and prev[2, 3] == 1
    assert ind[1, 0] == 1 and ind[2, 2] == 1 and ind[1, 1] == 0 and ind[0, 3] == 0
    assert dup[1, 1] == 1 and dup[1, 0] == 0
    assert not any(hp.has_hooks for hp in model.hook_dict.values())


def test_head_scores_match_cached_patterns_on_the_model(model):
    tokens = repeated_random_tokens(model, seq_len=7, n_seqs=2, seed=3, bos_token_id=0)
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    q = torch.arange(8, 15)                                                  # second repeat
    qp = torch.arange(1, 15)
    ref_ind = torch.stack([cache["pattern", i][:, :, q, q - 6].mean((0, 2)) for i in range(L)])
    ref_dup = torch.stack([cache["pattern", i][:, :, q, q - 7].mean((0, 2)) for i in range(L)])
    ref_prev = torch.stack([cache["pattern", i][:, :, qp, qp - 1].mean((0, 2)) for i in range(L)])
    torch.testing.assert_close(induction_scores(model, tokens), ref_ind, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(duplicate_token_scores(model, tokens), ref_dup, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(previous_token_scores(model, tokens), ref_prev, rtol=1e-5, atol=1e-6)
    default = induction_scores(model)                                        # own tokens, model's BOS
    assert default.shape == (L, H) and ((default >= 0) & (default <= 1)).all()
    with pytest.raises(ValueError, match="occurs twice"):
        induction_scores(model, torch.arange(10)[None])
