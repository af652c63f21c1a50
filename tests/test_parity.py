"""Parity with transformers' CohereForCausalLM (eager): bitwise on the explicit path."""

import pytest
import torch

from _reference import load_reference, make_hf_checkpoint, reference_residuals
from workbench import HookedCommandR

CONFIGS = {
    "gqa-qknorm": dict(num_attention_heads=4, num_key_value_heads=2, use_qk_norm=True),
    "mha-noqk": dict(num_attention_heads=4, num_key_value_heads=4, use_qk_norm=False),
    "mqa-qknorm-rplus": dict(num_attention_heads=4, num_key_value_heads=1, use_qk_norm=True,
                             logit_scale=0.8333333333333334, rope_theta=8e6),
    "gqa-theta8e6": dict(num_attention_heads=8, num_key_value_heads=2, use_qk_norm=False, rope_theta=8e6),
}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _fp16_supported():
    try:
        a = torch.randn(4, 4, dtype=torch.float16)
        torch.matmul(a, a)
        torch.nn.functional.softmax(a, -1, dtype=torch.float32)
        return True
    except RuntimeError:
        return False


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return make_hf_checkpoint(path, seed=len(request.param), **CONFIGS[request.param])


def _inputs(batch=3, pos=11, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, pos), generator=g)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_explicit_path_bitwise(checkpoint, dtype):
    if dtype == torch.float16 and not _fp16_supported():
        pytest.skip("float16 matmul not supported on this CPU")
    ref = load_reference(checkpoint, dtype)
    ours = HookedCommandR.from_pretrained(checkpoint, dtype=dtype)
    ours.attn_impl = "explicit"
    ids = _inputs()
    with torch.no_grad():
        ref_logits, ref_resid = reference_residuals(ref, ids)
        logits, cache = ours.run_with_cache(ids, names_filter=lambda n: "resid" in n)
    assert logits.dtype == ref_logits.dtype == dtype
    assert torch.equal(logits, ref_logits), (logits - ref_logits).abs().max()
    L = ours.cfg.n_layers
    for i in range(L):
        assert torch.equal(cache["resid_pre", i], ref_resid[i]), f"resid_pre {i}"
    assert torch.equal(cache["resid_post", L - 1], ref_resid[L]), "last resid_post"


def test_fused_path_close_fp32(checkpoint):
    ref = load_reference(checkpoint, torch.float32)
    ours = HookedCommandR.from_pretrained(checkpoint)
    assert ours.attn_impl == "auto"
    ids = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=1e-5, rtol=0)


def test_padded_batch_with_positions_bitwise(checkpoint):
    ref = load_reference(checkpoint, torch.float32)
    ours = HookedCommandR.from_pretrained(checkpoint)
    ours.attn_impl = "explicit"
    ids = _inputs(3, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask, position_ids=pos)
        real = mask.bool()
        assert torch.equal(got[real], want[real])
        ours.attn_impl = "fused"
        torch.testing.assert_close(ours(ids, attention_mask=mask, position_ids=pos)[real], want[real],
                                   atol=1e-5, rtol=0)
