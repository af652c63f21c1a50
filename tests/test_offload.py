"""device_map / accelerate dispatch: CPU + disk offload gives the plain model's logits, hooks, caches, generation."""

import os

import pytest
import torch

from _reference import make_hf_checkpoint
from workbench import HookedCommandR
from workbench.kv_cache import KVCache
from workbench.offload import device_for, execution_device, torch_device

VOCAB = 97
MIXED = {"cpu": 300_000}   # tiny model: embedding + block 0 fit, the rest goes to disk


def _ids(batch=2, pos=9, seed=0):
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["cohere", "cohere2"])
def ckpt(request, tmp_path_factory):
    kw = dict(num_hidden_layers=4, sliding_window=4) if request.param == "cohere2" else {}
    return make_hf_checkpoint(tmp_path_factory.mktemp(request.param), seed=5, model_type=request.param, **kw)


@pytest.fixture(scope="module")
def plain(ckpt):
    return HookedCommandR.from_pretrained(ckpt, progress=False)


def _offloaded(ckpt, folder=None, **kw):
    scale = 0.5 if kw.get("torch_dtype") in (torch.bfloat16, torch.float16) else 1.0
    kw.setdefault("max_memory", {"cpu": int(MIXED["cpu"] * scale)})
    model = HookedCommandR.from_pretrained(ckpt, device_map=kw.pop("device_map", "auto"), offload_folder=folder,
                                           progress=False, **kw)
    values = set(model.hf_device_map.values())
    assert values == {"cpu", "disk"}, model.hf_device_map
    return model


def _disk_params(model):
    return [n for n, p in model.named_parameters() if device_for(model.hf_device_map, n) == "disk"]


@pytest.mark.parametrize("use_folder", [False, True], ids=["in-place", "offload_folder"])
@pytest.mark.parametrize("impl", ["explicit", "auto"])
def test_cpu_disk_offload_logits_equal(ckpt, plain, tmp_path, use_folder, impl):
    folder = str(tmp_path / "offload") if use_folder else None
    model = _offloaded(ckpt, folder)
    disk = _disk_params(model)
    assert disk and all(model.get_parameter(n).is_meta for n in disk)       # really not in memory
    if use_folder:      # one subfolder per checkpoint and dtype (hardA: shared folders never overwrite)
        [sub] = [os.path.join(folder, d) for d in os.listdir(folder)]
        assert os.path.isfile(os.path.join(sub, "index.json"))
        assert any(f.startswith("blocks.") for f in os.listdir(sub))
    plain.attn_impl = model.attn_impl = impl
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))
    assert all(model.get_parameter(n).is_meta for n in disk)                 # offloaded again after use


@pytest.mark.parametrize("use_folder", [False, True], ids=["in-place", "offload_folder"])
def test_offload_with_cast_equals_plain_bf16(ckpt, tmp_path, use_folder):
    folder = str(tmp_path / "offload") if use_folder else None
    model = _offloaded(ckpt, folder, torch_dtype=torch.bfloat16)
    ref = HookedCommandR.from_pretrained(ckpt, torch_dtype=torch.bfloat16, progress=False)
    ids = _ids()
    with torch.no_grad():
        out = model(ids)
        assert out.dtype == torch.bfloat16 and torch.equal(out, ref(ids))


def test_explicit_dict_map_with_tied_unembedding_on_disk(ckpt, plain):
    n = plain.cfg.n_layers
    dm = {"embed": "cpu", "blocks.0": "cpu", "ln_final": "cpu", "unembed": "disk",
          **{f"blocks.{i}": "disk" for i in range(1, n)}}
    model = HookedCommandR.from_pretrained(ckpt, device_map=dm, progress=False)
    assert model.unembed.weight.is_meta and not model.embed.weight.is_meta
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))


def test_run_with_cache_and_hooks_under_offload(ckpt, plain):
    model = _offloaded(ckpt)
    ids = _ids()
    with torch.no_grad():
        ref_logits, ref_cache = plain.run_with_cache(ids)      # every hook incl. hook_result, hook_pattern
        logits, cache = model.run_with_cache(ids, device="cpu")
    assert torch.equal(logits, ref_logits)
    assert set(cache.keys()) == set(ref_cache.keys())
    assert any(k.endswith("attn.hook_result") for k in cache.keys())
    for name in ref_cache.keys():
        assert cache[name].device.type == "cpu"
        assert torch.equal(cache[name], ref_cache[name]), name

    fired = []

    def ablate_head(z, hook):            # zero head 1 of every layer's z
        fired.append(hook.layer)
        z = z.clone()
        z[:, :, 1] = 0
        return z

    hooks = [(lambda n: n.endswith("attn.hook_z"), ablate_head)]
    with torch.no_grad():
        got = model.run_with_hooks(ids, fwd_hooks=hooks)
        want = plain.run_with_hooks(ids, fwd_hooks=hooks)
    assert fired == list(range(plain.cfg.n_layers)) * 2
    assert torch.equal(got, want) and not torch.equal(got, ref_logits)
    assert all(not hp.has_hooks for hp in model.hook_dict.values())


def test_generation_under_offload(ckpt, plain):
    model = _offloaded(ckpt)
    ids = _ids(batch=2, pos=5)

    @torch.no_grad()
    def greedy(m, steps=6):
        cache = KVCache.for_model(m)
        logits = m(ids, kv_cache=cache)
        out, all_logits = [ids], [logits]
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            out.append(nxt)
            logits = m(nxt, kv_cache=cache)
            all_logits.append(logits)
        return torch.cat(out, 1), all_logits

    toks, lg = greedy(model)
    ref_toks, ref_lg = greedy(plain)
    assert torch.equal(toks, ref_toks)
    assert all(torch.equal(a, b) for a, b in zip(lg, ref_lg))
    try:
        import workbench.generation  # noqa: F401  (written in parallel; may not exist yet)
    except ImportError:
        pytest.skip("workbench.generation not available")
    got = model.generate(ids, max_new_tokens=6, eos_token_id=-1)
    want = plain.generate(ids, max_new_tokens=6, eos_token_id=-1)
    assert torch.equal(got, want) and torch.equal(got, toks)


def test_save_from_offloaded_model_gathers_weights(ckpt, plain, tmp_path):
    model = _offloaded(ckpt)
    model.save_pretrained(tmp_path / "out")
    back = HookedCommandR.from_pretrained(tmp_path / "out", progress=False)
    for name, p in plain.state_dict().items():
        assert torch.equal(back.state_dict()[name], p), name


def _first_device():
    """The device accelerate's strategies fill first when max_memory is not given: GPU 0 on a CUDA
    host, Apple's "mps" where that is the accelerator, else the CPU."""
    if torch.cuda.is_available():
        return 0
    mps = getattr(torch.backends, "mps", None)
    return "mps" if mps is not None and mps.is_available() else "cpu"


def test_unconstrained_strategies_put_everything_on_the_first_device(ckpt, plain):
    """No max_memory: the tiny model fits the first device (GPU 0 on a GPU host, the CPU on a CPU-only
    one), so one device holds everything and no accelerate hook is attached. With 2+ GPUs "auto" and
    "balanced" rightly spread the layers (test_auto_spreads_layers_over_gpus); "sequential" still fills GPU 0."""
    first = _first_device()
    device = torch_device(first)
    ref = plain if device.type == "cpu" else HookedCommandR.from_pretrained(ckpt, device=device, progress=False)
    ids = _ids().to(device)
    strategies = ("auto", "balanced", "sequential") if torch.cuda.device_count() < 2 else ("sequential",)
    for strategy in strategies:
        model = HookedCommandR.from_pretrained(ckpt, device_map=strategy, progress=False)
        assert set(model.hf_device_map.values()) == {first}, (strategy, model.hf_device_map)
        assert not hasattr(model.embed, "_hf_hook")          # one device: no accelerate hooks needed
        assert model.unembed.weight is model.embed.weight
        assert execution_device(model) == device and model.embed.weight.device == device
        with torch.no_grad():
            assert torch.equal(model(ids), ref(ids))        # same device, same kernels: same bits


def test_bad_device_map_arguments(ckpt):
    load = lambda **kw: HookedCommandR.from_pretrained(ckpt, progress=False, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="unknown module name.*'blocks.99'"):
        load(device_map={"": "cpu", "blocks.99": "cpu"})
    with pytest.raises(ValueError, match="no device for parameter.*blocks.1"):
        load(device_map={"embed": "cpu", "blocks.0": "cpu", "ln_final": "cpu", "unembed": "cpu"})
    with pytest.raises(ValueError, match=r"device_map\['blocks.0'\].*not a device"):
        load(device_map={"": "cpu", "blocks.0": "gpu-please"})
    with pytest.raises(ValueError, match="either device or device_map"):
        load(device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="max_memory is only used together with device_map"):
        load(max_memory={"cpu": "1GB"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_with_cpu_offload_equals_single_gpu(ckpt):
    """On a GPU machine: GPU 0 + CPU offload (+ more GPUs if present) == the model on one GPU."""
    one = HookedCommandR.from_pretrained(ckpt, device="cuda:0", progress=False)
    budget = {i: 300_000 for i in range(torch.cuda.device_count())}
    split = HookedCommandR.from_pretrained(ckpt, device_map="sequential", max_memory={**budget, "cpu": "1GB"},
                                           progress=False)
    assert "cpu" in split.hf_device_map.values() and 0 in split.hf_device_map.values()
    ids = _ids().cuda()
    with torch.no_grad():
        assert torch.equal(split(ids), one(ids))
        logits, cache = split.run_with_cache(ids, device="cpu")
    assert torch.equal(logits.cpu(), one(ids).cpu()) and cache["resid_post", 0].device.type == "cpu"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2+ CUDA GPUs")
def test_auto_spreads_layers_over_gpus(ckpt):
    n = torch.cuda.device_count()
    model = HookedCommandR.from_pretrained(ckpt, device_map="balanced", progress=False)
    used = {d for d in model.hf_device_map.values()}
    assert used == set(range(n)) or len(used) >= 2, model.hf_device_map
    one = HookedCommandR.from_pretrained(ckpt, device="cuda:0", progress=False)
    ids = _ids().cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).cpu(), one(ids).cpu(), rtol=0, atol=1e-5)


def test_everything_on_disk_forward_and_generate(ckpt, plain):
    """Even the embedding offloaded: forward works; generate needs model.device to be the execution device."""
    model = HookedCommandR.from_pretrained(ckpt, device_map="auto", max_memory={"cpu": 1000}, progress=False)
    assert set(model.hf_device_map.values()) == {"disk"} and model.embed.weight.is_meta
    assert execution_device(model).type == "cpu"
    ids = _ids(batch=1, pos=5)
    with torch.no_grad():
        assert torch.equal(model(ids), plain(ids))
    if model.device.type == "meta":
        pytest.xfail("HookedCommandR.device reads embed.weight.device (meta under offload); "
                     "needs the model.py patch using workbench.offload.execution_device")
    assert torch.equal(model.generate(ids, max_new_tokens=3, eos_token_id=-1),
                       plain.generate(ids, max_new_tokens=3, eos_token_id=-1))


def test_offload_files_are_64_byte_aligned(tmp_path):
    """Misaligned memory-mapped weights make MKL round differently from the plain load."""
    from safetensors import safe_open

    from workbench.offload import save_aligned

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        w = torch.randn(37, 53).to(dtype)
        file = str(tmp_path / f"w_{dtype}.safetensors")
        save_aligned("blocks.0.attn.o_proj.weight", w, file)
        with safe_open(file, framework="pt") as f:
            t = f.get_tensor("blocks.0.attn.o_proj.weight")
            assert f.metadata() == {"format": "pt"}
        assert torch.equal(t, w) and t.dtype == dtype
        assert (8 + int.from_bytes(open(file, "rb").read(8), "little")) % 64 == 0
