"""Hardening (issue 15, items 1, 2, 3, 4, 6, 9): nothing silently wrong after faults or interrupts.

1 caches saved from other weights are refused; 2 a shared offload_folder never rewrites another model's
files; 3 Ctrl-C reaches the caller with the tokens so far; 4 a memory-mapped checkpoint changed on disk
raises instead of SIGBUS / silently other weights; 6 a KV cache is rolled back when a forward raises and
generate refuses another prompt's cache; 9 cache entries are what each hook saw.
"""

import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from workbench import ActivationCache, CacheMismatchError, HookedCommandR
from workbench.generation import GenerationInterrupted
from workbench.hook_points import StopForward
from workbench.kv_cache import KVCache, KVCacheError
from workbench.loading import resolve_model_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
    return HookedCommandR.from_pretrained("command-r-tiny", progress=False)


@pytest.fixture(scope="module")
def other_ckpt(model, tmp_path_factory):
    """The bundled checkpoint with slightly different weights (a 'fine-tune' of the same shapes)."""
    other = HookedCommandR.from_pretrained("command-r-tiny", progress=False, mmap=False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    path = tmp_path_factory.mktemp("other") / "ckpt"
    other.save_pretrained(str(path))
    return str(path)


def _ids(n=7, seed=0, batch=1):
    return torch.randint(3, 200, (batch, n), generator=torch.Generator().manual_seed(seed))


def _no_hooks(m):
    return all(not hp.has_hooks for hp in m.hook_dict.values())


# ----------------------------------------------------------------------------------- 1 weights fingerprint
def test_saved_cache_from_other_weights_is_refused(model, other_ckpt, tmp_path):
    other = HookedCommandR.from_pretrained(other_ckpt, progress=False)
    ids = _ids()
    _, cache = other.run_with_cache(ids)
    cache.save(tmp_path / "other.safetensors")
    with pytest.raises(CacheMismatchError, match="other weights"):
        ActivationCache.load(tmp_path / "other.safetensors", model=model)
    with pytest.warns(UserWarning, match="other weights"):
        mixed = ActivationCache.load(tmp_path / "other.safetensors", model=model, allow_other_weights=True)
    assert torch.equal(mixed["resid_post", 1], cache["resid_post", 1])
    back = ActivationCache.load(tmp_path / "other.safetensors", model=other)          # its own weights: fine
    assert all(torch.equal(back[k], cache[k]) for k in cache)

    # weights edited in place after the forward: the file cannot name the weights that made it
    own = HookedCommandR.from_pretrained(other_ckpt, progress=False, mmap=False)
    _, cache = own.run_with_cache(ids)
    with torch.no_grad():
        own.blocks[0].mlp.down_proj.weight.mul_(2)
    with pytest.warns(UserWarning, match="weights changed"):
        cache.save(tmp_path / "edited.safetensors")
    with pytest.raises(CacheMismatchError, match="no weights fingerprint"):
        ActivationCache.load(tmp_path / "edited.safetensors", model=own)

    # shapes and dtypes against the hook table
    _, cache = model.run_with_cache(ids, names_filter=["hook_embed", "blocks.0.attn.hook_pattern"])
    bad = dict(cache.items())
    bad["hook_embed"] = bad["hook_embed"][..., :-1]
    ActivationCache(bad, model).save(tmp_path / "shape.safetensors")
    with pytest.raises(CacheMismatchError, match="d_model"):
        ActivationCache.load(tmp_path / "shape.safetensors", model=model)
    bad = dict(cache.items())
    bad["blocks.0.attn.hook_pattern"] = bad["blocks.0.attn.hook_pattern"].double()
    ActivationCache(bad, model).save(tmp_path / "dtype.safetensors")
    with pytest.raises(CacheMismatchError, match="hook_pattern"):
        ActivationCache.load(tmp_path / "dtype.safetensors", model=model)


# ----------------------------------------------------------------------------------- 2 shared offload folder
def test_shared_offload_folder_never_rewrites_another_models_files(model, other_ckpt, tmp_path):
    folder = str(tmp_path / "offload")
    disk = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "disk", "blocks.3": "disk",
            "ln_final": "cpu", "unembed": "cpu"}
    a = HookedCommandR.from_pretrained("command-r-tiny", device_map=disk, offload_folder=folder, progress=False)
    ids = _ids(9)
    with torch.no_grad():
        before = a(ids)
        assert torch.equal(before, model(ids))
        b = HookedCommandR.from_pretrained(other_ckpt, device_map=disk, offload_folder=folder, progress=False)
        assert not torch.equal(b(ids), before)                 # B really has other weights
        assert torch.equal(a(ids), before)                     # A's offloaded files untouched
        files = {f: os.stat(f).st_mtime_ns for f in a.mapped_files.paths}
        again = HookedCommandR.from_pretrained("command-r-tiny", device_map=disk, offload_folder=folder,
                                               progress=False)  # same checkpoint: its files are reused
        assert torch.equal(again(ids), before) and torch.equal(a(ids), before)
    assert len(os.listdir(folder)) == 2 and files == {f: os.stat(f).st_mtime_ns for f in files}


# ----------------------------------------------------------------------------------- 3 Ctrl-C
def test_ctrl_c_reaches_the_caller_with_the_tokens_so_far(model):
    prompts = [_ids(5, seed=s) for s in range(3)]
    full = model.generate(prompts[0], max_new_tokens=8, eos_token_id=[])
    started, streamed = [], []

    class Streamer:
        def put(self, ids):
            streamed.append(ids.reshape(-1).tolist())

        def end(self):
            streamed.append("end")

    def on_step(info):
        if info.step == 3:
            os.kill(os.getpid(), signal.SIGINT)          # a real Ctrl-C, delivered in the decode loop

    with pytest.raises(KeyboardInterrupt) as caught:
        for p in prompts:                                 # the loop a researcher writes: it must stop
            started.append(p)
            model.generate(p, max_new_tokens=8, eos_token_id=[], on_step=on_step, streamer=Streamer(),
                           capture=["hook_logits"], fwd_hooks=[("hook_embed", lambda x, hook: None)])
    assert len(started) == 1 and isinstance(caught.value, GenerationInterrupted)
    tokens = caught.value.tokens
    assert tokens.shape[1] >= prompts[0].shape[1] + 4 and torch.equal(tokens, full[:, :tokens.shape[1]])
    assert streamed[-1] == "end" and sum(len(s) for s in streamed[1:-1]) == tokens.shape[1] - 5
    assert _no_hooks(model)


# ----------------------------------------------------------------------------------- 4 mmap changed on disk
_MMAP_SCRIPT = textwrap.dedent("""
    import os, sys, torch
    from workbench import HookedCommandR
    from workbench.mapped_files import CheckpointChangedError
    ckpt, mode = sys.argv[1], sys.argv[2]
    m = HookedCommandR.from_pretrained(ckpt, torch_dtype="auto", progress=False)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        before = m(ids)
    f = os.path.join(ckpt, "model.safetensors")
    size = os.path.getsize(f)
    if mode == "truncate":
        os.truncate(f, size // 2)
    else:                                  # rewrite every weight byte, same size
        with open(f, "r+b") as fh:
            n = int.from_bytes(fh.read(8), "little")
            fh.seek(8 + n)
            fh.write(bytes(size - 8 - n))
    try:
        with torch.no_grad():
            after = m(ids)
        print("NO ERROR", torch.equal(after, before))
    except CheckpointChangedError as e:
        print("REFUSED", "model.safetensors" in str(e))
""")


@pytest.mark.parametrize("mode", ["truncate", "overwrite"])
def test_mmap_checkpoint_changed_on_disk_raises(tmp_path, mode):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_model_path("command-r-tiny"), ckpt)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-c", _MMAP_SCRIPT, str(ckpt), mode], capture_output=True, text=True,
                         env=env, timeout=120)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])      # -7 would be SIGBUS
    assert "REFUSED True" in run.stdout, run.stdout + run.stderr[-2000:]


def test_mmap_false_copies(tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(resolve_model_path("command-r-tiny"), ckpt)
    m = HookedCommandR.from_pretrained(str(ckpt), torch_dtype="auto", progress=False, mmap=False)
    ids = _ids()
    with torch.no_grad():
        before = m(ids)
        os.truncate(ckpt / "model.safetensors", 100)
        assert m.mapped_files is None and torch.equal(m(ids), before)


# ----------------------------------------------------------------------------------- 6 KV cache on error
def test_kv_cache_rolled_back_on_error_and_prefix_checked(model):
    ids = _ids(8)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model)
        model(ids[:, :5], kv_cache=cache)

        def stop(x, hook):
            raise StopForward

        def fail(x, hook):
            raise RuntimeError("hook failed")

        assert model.run_with_hooks(ids[:, 5:7], kv_cache=cache, fwd_hooks=[("blocks.2.hook_resid_pre", stop)]) is None
        with pytest.raises(RuntimeError, match="hook failed"):
            model.run_with_hooks(ids[:, 5:7], kv_cache=cache, fwd_hooks=[("blocks.3.attn.hook_z", fail)])
        assert cache.seen == 5 and all(cache.length(i) == 5 for i in range(cache.n_layers))
        rest = model(ids[:, 5:], kv_cache=cache)                    # continues as if nothing happened
    torch.testing.assert_close(rest, full[:, 5:], rtol=1e-4, atol=1e-4)   # fp32 noise of cached vs whole; a broken rollback is O(1)

    prefix = KVCache.for_model(model)
    with torch.no_grad():
        model(ids[:, :5], kv_cache=prefix)
    other = ids.clone()
    other[0, 3] = (other[0, 3] + 1) % 200
    with pytest.raises(KVCacheError, match="position 3") as refused:
        model.generate(other, max_new_tokens=3, kv_cache=prefix.clone())
    assert isinstance(refused.value, ValueError)                   # bad input, refused before anything runs
    out = model.generate(ids, max_new_tokens=3, kv_cache=prefix.clone(), eos_token_id=[])
    assert torch.equal(out, model.generate(ids, max_new_tokens=3, eos_token_id=[]))


# ----------------------------------------------------------------------------------- 9 cache entries
def test_cache_entries_are_what_each_hook_saw(model):
    ids = _ids(6)
    _, clean = model.run_with_cache(ids)

    def double(x, hook):
        x.mul_(2)                                      # in place, at a later hook than hook_embed

    _, cache = model.run_with_cache(ids, fwd_hooks=[("blocks.0.hook_resid_pre", double)])
    assert torch.equal(cache["embed"], clean["embed"])
    assert torch.equal(cache["resid_pre", 0], 2 * clean["embed"])

    seen = []                                          # generate's per-step capture too
    model.generate(ids, max_new_tokens=2, eos_token_id=[], capture=["hook_embed"],
                   on_step=lambda info: seen.append(info.activations["hook_embed"]),
                   fwd_hooks=[("blocks.0.hook_resid_pre", double)])
    assert torch.equal(seen[0], clean["embed"])
