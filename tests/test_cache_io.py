"""ActivationCache.save / load: bitwise round trip with metadata; a cache from another config is refused."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from workbench import ActivationCache, CommandRConfig, HookedCommandR
from workbench.activation_cache import CacheMismatchError
from workbench.analysis import direct_logit_attribution

CFG = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=48, use_qk_norm=True,
           logit_scale=0.25)


def make(dtype=None, **overrides):
    return HookedCommandR.from_config(CommandRConfig(**{**CFG, **overrides}), dtype=dtype, seed=0).eval()


def tokens(batch=2, pos=6):
    return torch.randint(0, 61, (batch, pos), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bitwise_with_metadata(tmp_path, dtype):
    model = make(dtype)
    ids = tokens()
    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
    path = tmp_path / "cache.safetensors"
    cache.save(path, tokens=ids)
    loaded = ActivationCache.load(path, model=model)
    assert list(loaded.keys()) == list(cache.keys())                   # same names, same (forward) order
    for name, t in cache.items():
        got = loaded[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got, t), name
    assert torch.equal(loaded.metadata["tokens"], ids)
    assert loaded.metadata["fingerprint"] == json.loads(json.dumps(model.cfg.fingerprint()))
    assert loaded.model is model and loaded.n_layers == 2
    assert torch.equal(loaded["pattern", 1], cache["pattern", 1])      # shorthand keys work
    with safe_open(str(path), framework="pt") as f:                    # plain safetensors, readable anywhere
        meta = f.metadata()
    assert meta["format"] == "workbench.activation_cache"
    assert json.loads(meta["hook_names"]) == list(cache.keys())


def test_loaded_cache_supports_analysis_and_resave(tmp_path):
    model = make()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens(), names_filter=lambda n: "hook_result" not in n)
    cache.save(tmp_path / "a.safetensors")
    loaded = ActivationCache.load(tmp_path / "a.safetensors", model=model)
    assert torch.equal(loaded.metadata["tokens"], tokens())   # run_with_cache records the prompt
    assert torch.equal(direct_logit_attribution(model, loaded, 3).values,
                       direct_logit_attribution(model, cache, 3).values)
    loaded.save(tmp_path / "b.safetensors")                            # a loaded cache saves again
    again = ActivationCache.load(tmp_path / "b.safetensors", model=model)
    assert all(torch.equal(again[n], cache[n]) for n in cache.keys())

    bare = ActivationCache.load(tmp_path / "a.safetensors")            # no model: tensors still readable
    assert bare.n_layers == 2 and torch.equal(bare["resid_post", -1], cache["resid_post", 1])
    with pytest.raises(ValueError, match="model"):
        bare.apply_ln_to_stack(bare.decompose_resid(return_labels=False))


def test_cache_from_another_config_is_refused(tmp_path):
    model = make()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens(), names_filter=lambda n: n.endswith("resid_pre"))
    path = tmp_path / "cache.safetensors"
    cache.save(path)
    other = make(d_mlp=64, logit_scale=0.5)
    with pytest.raises(CacheMismatchError) as err:
        ActivationCache.load(path, model=other)
    msg = str(err.value)
    assert "d_mlp (cache 48, model 64)" in msg and "logit_scale (cache 0.25, model 0.5)" in msg
    assert "n_layers" not in msg and str(path) in msg
    deeper = make(n_layers=3)
    with pytest.raises(CacheMismatchError, match="n_layers"):
        ActivationCache.load(path, model=deeper)
    ActivationCache.load(path, model=make())                          # same config, other weights object: fine


def test_bad_files_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        ActivationCache.load(tmp_path / "missing.safetensors")
    foreign = tmp_path / "weights.safetensors"
    save_file({"embed.weight": torch.zeros(3, 2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(CacheMismatchError, match="not an ActivationCache file"):
        ActivationCache.load(foreign)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CacheMismatchError, match="cannot read"):
        ActivationCache.load(junk)

    # a cache saved without a model has no fingerprint: refused with a model unless strict=False
    model = make()
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens(), names_filter="hook_embed")
    plain = ActivationCache(dict(cache.items()))
    plain.save(tmp_path / "plain.safetensors")
    with pytest.raises(CacheMismatchError, match="strict=False"):
        ActivationCache.load(tmp_path / "plain.safetensors", model=model)
    loaded = ActivationCache.load(tmp_path / "plain.safetensors", model=model, strict=False)
    assert torch.equal(loaded["embed"], cache["embed"])
