"""The explicit path hands its matmuls the same memory layouts as transformers' eager path.

Equal values are not enough for equal bits: BLAS chooses its kernel (and so its summation order)
from the operands' strides, and a layout difference that happens to round the same on one CPU
rounds differently on another (an MHA key passed as a strided view instead of a contiguous tensor
broke bitwise parity on AMD hosts only). Comparing shapes *and strides* at each stage shows such a
divergence on any host.
"""

import pytest
import torch

import workbench.model as wm
from _reference import load_reference, make_hf_checkpoint
from workbench import HookedCommandR
from workbench.kv_cache import KVCache

CONFIGS = {
    "mha": dict(model_type="cohere", num_attention_heads=4, num_key_value_heads=4, use_qk_norm=False),
    "gqa": dict(model_type="cohere", num_attention_heads=4, num_key_value_heads=2, use_qk_norm=True),
    "mqa": dict(model_type="cohere", num_attention_heads=4, num_key_value_heads=1, use_qk_norm=True),
    "cohere2-mha": dict(model_type="cohere2", num_attention_heads=4, num_key_value_heads=4,
                        sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
}


def _layout(t: torch.Tensor):
    return tuple(t.shape), t.stride()


@pytest.fixture(scope="module", params=[(c, d) for c in CONFIGS for d in (torch.float32, torch.bfloat16)],
                ids=lambda p: f"{p[0]}-{str(p[1]).replace('torch.', '')}")
def pair(request, tmp_path_factory):
    name, dtype = request.param
    path = make_hf_checkpoint(tmp_path_factory.mktemp(name), num_hidden_layers=2, **CONFIGS[name])
    ref = load_reference(path, dtype)
    ours = HookedCommandR.from_pretrained(path, dtype=dtype)
    ours.attn_impl = "explicit"
    return ref, ours


def _spy_reference(monkeypatch, ref, records):
    module = __import__(type(ref).__module__, fromlist=["eager_attention_forward"])
    original = module.eager_attention_forward

    def spy(mod, query, key, value, attention_mask, scaling, **kw):
        out, weights = original(mod, query, key, value, attention_mask, scaling, **kw)
        records.append(dict(query=_layout(query), key=_layout(key), value=_layout(value),
                            pattern=_layout(weights)))
        return out, weights

    monkeypatch.setattr(module, "eager_attention_forward", spy)
    for layer in ref.model.layers:
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda mod, args: records.append(dict(z_flat=_layout(args[0]))))


def _spy_ours(monkeypatch, ours, records):
    original = wm.eager_attention

    def spy(attn, query, key, value, mask):
        seen = {}

        def grab(pattern, hook):
            seen["pattern"] = _layout(pattern)

        handle = attn.hook_pattern.add_hook(grab)
        try:
            z = original(attn, query, key, value, mask)
        finally:
            handle()
        records.append(dict(query=_layout(query), key=_layout(key), value=_layout(value), **seen))
        return z

    monkeypatch.setattr(wm, "eager_attention", spy)
    for block in ours.blocks:
        block.attn.o_proj.register_forward_pre_hook(
            lambda mod, args: records.append(dict(z_flat=_layout(args[0]))))


def _reference_step(ref, ids, mask, positions, cache):
    kwargs = dict(attention_mask=mask, position_ids=positions, use_cache=True)
    try:
        return ref(ids, cache=cache, **kwargs)
    except TypeError:                                 # transformers 4.x spelling
        return ref(ids, past_key_values=cache, **kwargs)


@pytest.mark.parametrize("padded", [False, True], ids=["batch1", "left-padded"])
def test_explicit_layouts_equal_reference(pair, padded, monkeypatch):
    ref, ours = pair
    g = torch.Generator().manual_seed(3)
    if padded:
        ids = torch.randint(7, 97, (3, 9), generator=g)
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[1, :3] = 0
        mask[2, :5] = 0
        ids[mask == 0] = 0
    else:
        ids = torch.randint(7, 97, (1, 9), generator=g)
        mask = torch.ones(1, 9, dtype=torch.long)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ref_rec, our_rec = [], []
    _spy_reference(monkeypatch, ref, ref_rec)
    _spy_ours(monkeypatch, ours, our_rec)
    cache = KVCache.for_model(ours)
    with torch.no_grad():
        out = _reference_step(ref, ids, mask, positions, None)
        ours(ids, attention_mask=mask, position_ids=positions, kv_cache=cache)
        ref_cache = out.past_key_values
        for step in range(3):                         # decode steps over the cache
            nxt = torch.randint(7, 97, (ids.shape[0], 1), generator=g)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            pos = positions[:, -1:] + 1 + step
            out = _reference_step(ref, nxt, mask, pos, ref_cache)
            ref_cache = out.past_key_values
            ours(nxt, attention_mask=mask, position_ids=pos, kv_cache=cache)
    assert len(ref_rec) == len(our_rec) == 2 * 2 * 4      # 4 forwards x 2 layers x (attention, o_proj)
    for i, (r, o) in enumerate(zip(ref_rec, our_rec)):
        assert r == o, f"record {i} (forward {i // 4}, layer {(i // 2) % 2}): reference {r} vs ours {o}"
