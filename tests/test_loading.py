"""Loading real checkpoint folders: shards, both config spellings, dtypes, low memory, bad input, save."""

import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _reference import load_reference, make_hf_checkpoint
from workbench import ConfigError, HookedCommandR, estimate_memory
from workbench.config import CommandRConfig
from workbench.loading import CheckpointError, hf_to_ours, ours_to_hf, parse_size

VOCAB = 97


def _ids(batch=2, pos=10, seed=0):
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _load(path, **kw):
    model = HookedCommandR.from_pretrained(path, progress=False, **kw)
    model.attn_impl = "explicit"       # the bit-exact path
    return model


@torch.no_grad()
def _logits(model, ids):
    return model(ids)


def _fp16_ok():
    try:
        a = torch.randn(4, 4, dtype=torch.float16)
        torch.matmul(a, a)
        return True
    except RuntimeError:
        return False


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("cohere"), seed=1)


@pytest.fixture(scope="module")
def ckpt2(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("cohere2"), seed=2, model_type="cohere2",
                              num_hidden_layers=4, sliding_window=4)


def _edit_config(path, fn):
    file = os.path.join(path, "config.json")
    with open(file) as f:
        d = json.load(f)
    fn(d)
    with open(file, "w") as f:
        json.dump(d, f)


def _spell_4x(d):
    """transformers 4.x spelling: top-level rope_theta, torch_dtype."""
    rope = d.pop("rope_parameters", None) or {}
    d["rope_theta"] = rope.get("rope_theta", d.get("rope_theta"))
    d["torch_dtype"] = d.pop("dtype", d.get("torch_dtype"))


def _spell_5x(d):
    """transformers 5.x spelling: rope_parameters, dtype."""
    theta = d.pop("rope_theta", None)
    if theta is not None:
        d["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    if "torch_dtype" in d:
        d["dtype"] = d.pop("torch_dtype")


def _copy(src, dst, tensors=None, config=None, drop=()):
    """A copy of a single-file checkpoint with edited tensors / config."""
    os.makedirs(dst, exist_ok=True)
    for f in os.listdir(src):
        if f != "model.safetensors" and os.path.isfile(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), dst)
    state = load_file(os.path.join(src, "model.safetensors"))
    for name in drop:
        del state[name]
    if tensors:
        tensors(state)
    save_file(state, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    if config:
        _edit_config(dst, config)
    return dst


def _three_shards(ref, dst):
    """transformers' own save_pretrained with a max_shard_size that gives exactly 3 shards."""
    total = sum(p.numel() * p.element_size() for p in ref.state_dict().values())
    for frac in (3.0, 2.8, 2.6, 2.4, 2.2, 2.0):
        shutil.rmtree(dst, ignore_errors=True)
        ref.save_pretrained(dst, max_shard_size=int(total / frac) + 1)
        shards = [f for f in os.listdir(dst) if f.endswith(".safetensors")]
        if len(shards) == 3:
            return dst
    raise AssertionError(f"could not make 3 shards, got {shards}")


# ------------------------------------------------------------------------------------------ names
def test_name_map_round_trips():
    model = HookedCommandR(CommandRConfig.from_dict({
        "model_type": "cohere", "vocab_size": 11, "hidden_size": 8, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 12, "use_qk_norm": True}))
    for name in model.state_dict():
        assert hf_to_ours(ours_to_hf(name)) == name
    assert hf_to_ours("model.layers.12.mlp.up_proj.weight") == "blocks.12.mlp.up_proj.weight"
    assert hf_to_ours("model.layers.0.self_attn.rotary_emb.inv_freq") is None


# ------------------------------------------------------------------------------- shards + spellings
@pytest.mark.parametrize("which", ["cohere", "cohere2"])
@pytest.mark.parametrize("spelling", ["4x", "5x"])
def test_three_shards_both_spellings_equal_single_file(which, spelling, ckpt, ckpt2, tmp_path):
    src = ckpt if which == "cohere" else ckpt2
    ref = load_reference(src)
    sharded = _three_shards(ref, str(tmp_path / "sharded"))
    _edit_config(sharded, _spell_4x if spelling == "4x" else _spell_5x)
    with open(os.path.join(sharded, "config.json")) as f:
        d = json.load(f)
    assert ("rope_theta" in d and "torch_dtype" in d) if spelling == "4x" else ("rope_parameters" in d and "dtype" in d)
    with open(os.path.join(sharded, "model.safetensors.index.json")) as f:
        assert len(set(json.load(f)["weight_map"].values())) == 3
    ids = _ids()
    single = _logits(_load(src), ids)
    assert torch.equal(_logits(_load(sharded), ids), single)
    with torch.no_grad():
        assert torch.equal(single, ref(ids).logits)


# ------------------------------------------------------------------------------------------- dtypes
@pytest.fixture(scope="module")
def ckpt_bf16_config(ckpt, tmp_path_factory):
    """fp32 file whose config.json says bfloat16 (so "auto" differs from the float32 default)."""
    dst = str(tmp_path_factory.mktemp("bf16cfg"))
    shutil.copytree(ckpt, dst, dirs_exist_ok=True)
    _edit_config(dst, lambda d: (d.pop("dtype", None), d.__setitem__("torch_dtype", "bfloat16")))
    return dst


@pytest.mark.parametrize("kw,expect", [
    ({}, torch.float32),
    ({"torch_dtype": "auto"}, torch.bfloat16),
    ({"dtype": "auto"}, torch.bfloat16),
    ({"torch_dtype": torch.float16}, torch.float16),
    ({"torch_dtype": "bfloat16"}, torch.bfloat16),
    ({"dtype": torch.float32}, torch.float32),
], ids=["default", "auto", "dtype-auto", "fp16", "bf16", "fp32"])
def test_dtype_paths_match_reference(ckpt_bf16_config, kw, expect):
    if expect == torch.float16 and not _fp16_ok():
        pytest.skip("float16 matmul not supported on this CPU")
    model = _load(ckpt_bf16_config, **kw)
    assert model.dtype == expect
    assert all(p.dtype == expect for p in model.parameters())
    ids = _ids()
    ref = load_reference(ckpt_bf16_config, expect)
    with torch.no_grad():
        ref_logits = ref(ids).logits
    ours = _logits(model, ids)
    assert ours.dtype == expect
    assert torch.equal(ours, ref_logits), (ours.float() - ref_logits.float()).abs().max()


def test_bf16_file_auto_is_bitwise_and_default_upcasts(ckpt, tmp_path):
    ref = load_reference(ckpt, torch.bfloat16)
    ref.save_pretrained(tmp_path / "bf16")
    path = str(tmp_path / "bf16")
    auto = _load(path, torch_dtype="auto")
    default = _load(path)
    assert auto.dtype == torch.bfloat16 and default.dtype == torch.float32
    file = load_file(os.path.join(path, "model.safetensors"))
    for hf_name, t in file.items():
        assert torch.equal(auto.get_parameter(hf_to_ours(hf_name)), t), hf_name
        assert torch.equal(default.get_parameter(hf_to_ours(hf_name)), t.float()), hf_name
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(_logits(auto, ids), ref(ids).logits)


def test_dtype_arguments_validated(ckpt):
    with pytest.raises(ValueError, match="disagree"):
        HookedCommandR.from_pretrained(ckpt, torch_dtype="float16", dtype="bfloat16", progress=False)
    with pytest.raises(ValueError, match="int8"):
        HookedCommandR.from_pretrained(ckpt, torch_dtype="int8", progress=False)
    same = HookedCommandR.from_pretrained(ckpt, torch_dtype="bf16", dtype=torch.bfloat16, progress=False)
    assert same.dtype == torch.bfloat16


# --------------------------------------------------------------------------------------- low memory
def _mapping_of(ptr):
    """The file backing the memory mapping that contains address ``ptr`` (None if anonymous)."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= ptr < hi:
                return parts[5] if len(parts) > 5 else None
    return None


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_matching_dtype_is_memory_mapped_and_cast_is_not(ckpt):
    file = os.path.realpath(os.path.join(ckpt, "model.safetensors"))
    mapped = _load(ckpt)                                 # fp32 file, fp32 load: no copy
    for name, p in mapped.named_parameters():
        assert _mapping_of(p.data_ptr()) == file, f"{name} was copied instead of memory-mapped"
    cast = _load(ckpt, torch_dtype=torch.bfloat16)       # cast: fresh memory, no file mapping left
    for name, p in cast.named_parameters():
        assert _mapping_of(p.data_ptr()) != file, name
    assert mapped.unembed.weight is mapped.embed.weight and cast.unembed.weight is cast.embed.weight
    # in-place edits (ablations) stay private to the process: the file is untouched
    with torch.no_grad():
        mapped.embed.weight.zero_()
    with safe_open(file, "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").abs().sum() > 0


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_resident_memory_over_load(tmp_path):
    """fp32->fp32 keeps pages on disk until used; fp32->bf16 holds ~the bf16 bytes, not fp32 + bf16."""
    cfg = CommandRConfig.from_dict({"model_type": "cohere", "vocab_size": 8192, "hidden_size": 512,
                                    "num_hidden_layers": 2, "num_attention_heads": 8, "intermediate_size": 1024})
    HookedCommandR.from_config(cfg, seed=0).save_pretrained(tmp_path)
    file_bytes = cfg.n_params * 4
    before = _rss_bytes()
    m32 = HookedCommandR.from_pretrained(tmp_path, progress=False)
    rise32 = _rss_bytes() - before
    del m32
    before = _rss_bytes()
    m16 = HookedCommandR.from_pretrained(tmp_path, torch_dtype=torch.bfloat16, progress=False)
    rise16 = _rss_bytes() - before
    print(f"file {file_bytes / 1e6:.1f} MB: resident rise fp32 {rise32 / 1e6:.1f} MB, bf16 {rise16 / 1e6:.1f} MB")
    assert rise32 < 0.25 * file_bytes
    assert rise16 < 0.5 * file_bytes + 8e6      # the bf16 copy (half the file) plus allocator slack
    assert m16.dtype == torch.bfloat16


# -------------------------------------------------------------------------------- metadata, bundled
def test_generation_config_and_name(ckpt, tmp_path):
    model = _load(ckpt)
    assert model.generation_config["eos_token_id"] == 6 and model.name_or_path == ckpt
    bare = _copy(ckpt, str(tmp_path / "bare"))
    os.remove(os.path.join(bare, "generation_config.json"))
    assert _load(bare).generation_config == {}
    with open(os.path.join(bare, "generation_config.json"), "w") as f:
        f.write("{not json")
    with pytest.raises(CheckpointError, match="generation_config.json"):
        _load(bare)


def test_unknown_name_is_file_not_found():
    with pytest.raises(FileNotFoundError, match="no-such-model-xyz"):
        HookedCommandR.from_pretrained("no-such-model-xyz", progress=False)


# ------------------------------------------------------------------------------------ lm_head, bias
def test_lm_head_equal_to_embedding_is_accepted(ckpt, tmp_path):
    path = _copy(ckpt, str(tmp_path / "lm"), tensors=lambda s: s.__setitem__(
        "lm_head.weight", s["model.embed_tokens.weight"].clone()))
    model = _load(path)
    assert model.unembed.weight is model.embed.weight
    assert torch.equal(_logits(model, _ids()), _logits(_load(ckpt), _ids()))


def test_lm_head_different_while_tied_is_refused(ckpt, tmp_path):
    path = _copy(ckpt, str(tmp_path / "lm"), tensors=lambda s: s.__setitem__(
        "lm_head.weight", s["model.embed_tokens.weight"] + 1))
    with pytest.raises(CheckpointError, match="lm_head.weight differs.*tie_word_embeddings"):
        _load(path)


def test_untied_lm_head_is_honoured(tmp_path):
    path = make_hf_checkpoint(tmp_path / "src", seed=3, tie_word_embeddings=False)
    model = _load(path)
    assert model.unembed.weight is not model.embed.weight
    assert not torch.equal(model.unembed.weight, model.embed.weight)
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(_logits(model, ids), load_reference(path)(ids).logits)
    missing = _copy(path, str(tmp_path / "nolm"), drop=["lm_head.weight"])
    with pytest.raises(CheckpointError, match=r"missing tensors: lm_head.weight \(unembed.weight\)"):
        _load(missing)


def test_cohere2_zero_biases_dropped_nonzero_refused(ckpt2, tmp_path):
    def add_bias(value):
        def fn(s):
            s["model.layers.0.self_attn.q_proj.bias"] = torch.full((64,), value)
            s["model.layers.1.mlp.down_proj.bias"] = torch.zeros(64)
        return fn

    ok = _load(_copy(ckpt2, str(tmp_path / "zero"), tensors=add_bias(0.0)))
    assert torch.equal(_logits(ok, _ids()), _logits(_load(ckpt2), _ids()))
    with pytest.raises(CheckpointError, match="q_proj.bias.*non-zero bias"):
        _load(_copy(ckpt2, str(tmp_path / "nonzero"), tensors=add_bias(0.5)))


# -------------------------------------------------------------------------- bad input, one test each
def test_missing_folder():
    with pytest.raises(FileNotFoundError, match="/nonexistent/ckpt"):
        HookedCommandR.from_pretrained("/nonexistent/ckpt", progress=False)


def test_missing_config(ckpt, tmp_path):
    path = _copy(ckpt, str(tmp_path / "c"))
    os.remove(os.path.join(path, "config.json"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        _load(path)


def test_config_keys_missing(ckpt, tmp_path):
    path = _copy(ckpt, str(tmp_path / "c"), config=lambda d: (d.pop("hidden_size"), d.pop("vocab_size")))
    with pytest.raises(ConfigError, match="missing required keys.*vocab_size.*hidden_size|hidden_size.*vocab_size"):
        _load(path)


def test_model_type_not_cohere(ckpt, tmp_path):
    path = _copy(ckpt, str(tmp_path / "c"), config=lambda d: d.__setitem__("model_type", "llama"))
    with pytest.raises(ConfigError, match="model_type.*'llama'"):
        _load(path)


def test_shard_named_in_index_missing(ckpt, tmp_path):
    path = _three_shards(load_reference(ckpt), str(tmp_path / "s"))
    os.remove(os.path.join(path, "model-00002-of-00003.safetensors"))
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        _load(path)


def test_index_points_to_wrong_shard(ckpt, tmp_path):
    path = _three_shards(load_reference(ckpt), str(tmp_path / "s"))
    index = os.path.join(path, "model.safetensors.index.json")
    with open(index) as f:
        d = json.load(f)
    d["weight_map"]["model.norm.weight"] = ("model-00001-of-00003.safetensors"
                                            if d["weight_map"]["model.norm.weight"] != "model-00001-of-00003.safetensors"
                                            else "model-00002-of-00003.safetensors")
    with open(index, "w") as f:
        json.dump(d, f)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        _load(path)


def test_missing_tensors_listed(ckpt, tmp_path):
    path = _copy(ckpt, str(tmp_path / "m"), drop=["model.layers.1.mlp.up_proj.weight",
                                                  "model.layers.2.self_attn.q_norm.weight"])
    with pytest.raises(CheckpointError, match=r"missing tensors: model.layers.1.mlp.up_proj.weight.*"
                                              r"model.layers.2.self_attn.q_norm.weight"):
        _load(path)


def test_unexpected_tensors_listed(ckpt, tmp_path):
    path = _copy(ckpt, str(tmp_path / "u"), tensors=lambda s: s.update({
        "model.layers.0.extra_proj.weight": torch.ones(3), "vision_tower.w": torch.ones(2)}))
    with pytest.raises(CheckpointError, match="unexpected tensors: model.layers.0.extra_proj.weight, vision_tower.w"):
        _load(path)


def test_shape_mismatch_names_tensor_and_shapes(ckpt, tmp_path):
    path = _copy(ckpt, str(tmp_path / "s"), tensors=lambda s: s.__setitem__(
        "model.layers.1.mlp.gate_proj.weight", torch.zeros(100, 64)))
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.gate_proj.weight: file \[100, 64\] "
                                              r"vs expected \[112, 64\]"):
        _load(path)


def test_truncated_safetensors(ckpt, tmp_path):
    path = _copy(ckpt, str(tmp_path / "t"))
    file = os.path.join(path, "model.safetensors")
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) - 100)
    with pytest.raises(CheckpointError, match=r"model.safetensors.*truncated or corrupt"):
        _load(path)


def test_corrupt_safetensors(ckpt, tmp_path):
    path = _copy(ckpt, str(tmp_path / "c"))
    with open(os.path.join(path, "model.safetensors"), "wb") as f:
        f.write(b"\x00not a safetensors file at all" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors.*not a readable safetensors"):
        _load(path)


def test_pickle_only_is_refused_never_unpickled(ckpt, tmp_path):
    path = str(tmp_path / "pkl")
    os.makedirs(path)
    shutil.copy(os.path.join(ckpt, "config.json"), path)
    marker = tmp_path / "unpickled"

    class Boom:  # unpickling this would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"x": Boom()}, os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*refusing to unpickle"):
        _load(path)
    assert not marker.exists()


def test_no_weights_at_all(ckpt, tmp_path):
    path = str(tmp_path / "empty")
    os.makedirs(path)
    shutil.copy(os.path.join(ckpt, "config.json"), path)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        _load(path)


# -------------------------------------------------------------------------------------------- save
def test_save_sharded_transformers_loads_equal_logits(ckpt, tmp_path):
    model = _load(ckpt)
    out = str(tmp_path / "saved")
    model.save_pretrained(out, max_shard_size="200KB")
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)], files
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["CohereForCausalLM"] and cfg["torch_dtype"] == "float32"
    assert "lm_head.weight" not in index["weight_map"]
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in model.parameters())
    ids = _ids()
    ref = load_reference(out)
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, _logits(model, ids))
    again = _load(out)
    for name, p in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], p), name
    assert again.generation_config == model.generation_config


def test_save_bf16_cohere2_single_file_round_trip(ckpt2, tmp_path):
    model = _load(ckpt2, torch_dtype=torch.bfloat16)
    out = str(tmp_path / "saved")
    model.save_pretrained(out)
    assert sorted(f for f in os.listdir(out) if "safetensors" in f) == ["model.safetensors"]
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["Cohere2ForCausalLM"] and cfg["torch_dtype"] == "bfloat16"
    back = _load(out, torch_dtype="auto")
    assert back.dtype == torch.bfloat16
    for name, p in model.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(load_reference(out, torch.bfloat16)(ids).logits, _logits(model, ids))


def test_save_into_own_folder_and_untied(tmp_path):
    """Re-saving over the (memory-mapped) source folder: the loaded model keeps its weights."""
    path = make_hf_checkpoint(tmp_path / "u", seed=4, tie_word_embeddings=False)
    model = _load(path)
    ids = _ids()
    before = _logits(model, ids)
    model.save_pretrained(path, max_shard_size="200KB")      # now sharded: the old single file goes
    assert not os.path.exists(os.path.join(path, "model.safetensors"))
    assert torch.equal(_logits(model, ids), before)
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        assert "lm_head.weight" in json.load(f)["weight_map"]
    assert torch.equal(_logits(_load(path), ids), before)
    model.save_pretrained(path)                                # back to one file: stale shards removed
    assert sorted(f for f in os.listdir(path) if "safetensors" in f) == ["model.safetensors"]


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30
    assert parse_size("500kB") == 500_000 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


# -------------------------------------------------------------------------------- estimate_memory
def test_estimate_memory_command_r_and_cohere2():
    est = estimate_memory("command-r-v01", dtype="bfloat16", batch=1, seq_len=8192)
    cfg = CommandRConfig.from_preset("command-r-v01")
    assert est.weight_bytes == cfg.n_params * 2 and 69e9 < est.weight_bytes < 71e9
    assert est.kv_cache_bytes == 40 * 2 * 64 * 128 * 8192 * 2
    assert est.pattern_bytes_per_layer[0] == 64 * 8192 * 8192 * 2
    assert "weights" in str(est) and "70.0 GB" in str(est)
    r7b = estimate_memory("command-r7b-12-2024", dtype="float32", batch=2, seq_len=10000)
    assert r7b.global_layers == [3, 7, 11, 15, 19, 23, 27, 31] and len(r7b.local_layers) == 24
    local_kv = 2 * 2 * 8 * 4095 * 128 * 4
    global_kv = 2 * 2 * 8 * 10000 * 128 * 4
    assert r7b.kv_cache_bytes_per_layer[0] == local_kv and r7b.kv_cache_bytes_per_layer[3] == global_kv
    assert "24 local / 8 global" in str(r7b)
    q = estimate_memory("command-r-plus", weights="nf4")
    assert q.weight_bytes < 0.35 * estimate_memory("command-r-plus").weight_bytes
    with pytest.raises(KeyError, match="unknown preset"):
        estimate_memory("gpt-2")
