"""workbench.experiments: batched activations equal the one-prompt forward, resume after a kill, Ray == local.

Every stored row is compared with ``run_with_cache`` on its prompt alone (fp32, 1e-5); the resume test kills a
real subprocess mid-run; the Ray tests start one local Ray instance (2 CPUs) for the module and skip with the
reason when Ray is not installed or cannot start on this machine.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from workbench import CommandRConfig, HookedCommandR, HookError
from workbench.experiments import ActivationDataset, ExperimentMismatchError, collect_activations, map_prompts
from workbench.fingerprint import config_fingerprint, weights_fingerprint

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = dict(vocab_size=89, d_model=48, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=80, use_qk_norm=True,
           logit_scale=0.37, pad_token_id=0)
# [batch pos ...] hooks of several kinds: residual, per-head, MLP, final norm (and its fp32 scale)
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.2.mlp.hook_post", "ln_final.hook_scale"]


def build(seed: int = 1) -> HookedCommandR:
    m = HookedCommandR.from_config(CommandRConfig(**CFG), seed=seed)
    with torch.no_grad():  # non-unit norms, so a wrong LayerNorm would show
        g = torch.Generator().manual_seed(seed + 1)
        for name, p in m.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return m.eval()


def make_prompts(n: int = 14, seed: int = 0, max_len: int = 19) -> list:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=g).tolist()
    return [torch.randint(1, CFG["vocab_size"], (k,), generator=g).tolist() for k in lengths]


@pytest.fixture(scope="module")
def model():
    return build()


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-random")
    model.save_pretrained(path)
    return str(path)


def count_forwards(model):
    calls = []
    handle = model.embed.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def alone(model, ids, names):
    _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=names)
    return {n: cache[n][0] for n in names}


# ---------------------------------------------------------------------------------------- values
def test_every_stored_row_equals_run_with_cache_alone(model, tmp_path):
    prompts = make_prompts()
    ds = collect_activations(model, prompts, HOOKS, tmp_path, batch_size=4, shard_size=4, progress=False)
    assert len(ds) == len(prompts) and ds.hook_names == HOOKS
    assert ds.n_rows == sum(map(len, prompts))
    for i, ids in enumerate(prompts):
        ref = alone(model, ids, HOOKS)
        got = ds[i]
        for name in HOOKS:
            assert got[name].shape == ref[name].shape, (i, name)
            torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5, msg=f"prompt {i} {name}")
        assert ds.tokens(i).tolist() == ids
        assert ds.positions(i).tolist() == list(range(len(ids)))
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["complete"] and m["version"] == 1 and m["hook_names"] == HOOKS
    assert m["model"]["weights_fingerprint"] == weights_fingerprint(model)
    assert m["model"]["config_fingerprint"] == config_fingerprint(model.cfg)
    assert len(m["shards"]) == 4 and sorted(p.name for p in tmp_path.glob("shard-*")) == [s["file"] for s in m["shards"]]
    assert m["tensors"]["blocks.1.attn.hook_z"] == {"dtype": "float32", "shape": [4, 12]}
    # bucketing: a shard holds prompts of neighbouring lengths
    lengths = [[len(prompts[p]) for p in s["prompts"]] for s in m["shards"]]
    assert all(max(a) <= min(b) for a, b in zip(lengths, lengths[1:]))


def test_cohere2_sliding_window_rows_equal_alone(tmp_path):
    # left padding shifts cache indices, not the distances a sliding window (5) compares
    cfg = CommandRConfig(**{**CFG, "n_layers": 4, "use_qk_norm": False}, model_type="cohere2", sliding_window=5,
                         layer_types=["sliding_attention", "full_attention"] * 2)
    m = HookedCommandR.from_config(cfg, seed=2).eval()
    prompts = make_prompts(6, seed=29, max_len=14)
    names = ["blocks.0.hook_resid_post", "blocks.2.attn.hook_rot_k", "blocks.3.hook_resid_post"]
    ds = collect_activations(m, prompts, names, tmp_path, batch_size=3, progress=False)
    for i, ids in enumerate(prompts):
        ref = alone(m, ids, names)
        for name in names:
            torch.testing.assert_close(ds[i][name], ref[name], rtol=0, atol=1e-5, msg=f"prompt {i} {name}")


def test_positions_last_callable_and_dtype(model, tmp_path):
    prompts = make_prompts(9, seed=3)
    names = ["blocks.2.hook_resid_post"]
    last = collect_activations(model, prompts, names, tmp_path / "last", batch_size=3, positions="last", progress=False)
    even = collect_activations(model, prompts, names, tmp_path / "even", batch_size=3, dtype="float16",
                               positions=lambda ids: [p for p in range(len(ids)) if p % 2 == 0], progress=False)
    for i, ids in enumerate(prompts):
        ref = alone(model, ids, names)[names[0]]
        torch.testing.assert_close(last[i][names[0]], ref[-1:], rtol=0, atol=1e-5)
        assert even[i][names[0]].dtype == torch.float16
        assert even.positions(i).tolist() == list(range(0, len(ids), 2))
        torch.testing.assert_close(even[i][names[0]], ref[::2].half(), rtol=0, atol=1e-3)


def test_iter_batches_visits_every_row_once(model, tmp_path):
    prompts = make_prompts(11, seed=5)
    name = "blocks.0.hook_resid_post"
    ds = collect_activations(model, prompts, [name], tmp_path, batch_size=2, shard_size=2, progress=False)
    for shuffle in (False, True):
        seen = {}
        sizes = []
        for rows in ds.iter_batches(5, shuffle=shuffle, seed=7):
            sizes.append(len(rows["tokens"]))
            for x, t, p, q in zip(rows[name], rows["tokens"], rows["prompt"], rows["position"]):
                assert (int(p), int(q)) not in seen
                seen[int(p), int(q)] = (x, int(t))
        assert len(seen) == ds.n_rows and all(s == 5 for s in sizes[:-1])
        for i, ids in enumerate(prompts):
            for q, tok in enumerate(ids):
                x, t = seen[i, q]
                assert t == tok and torch.equal(x, ds[i][name][q])
    first = [r["prompt"].tolist() for r in ds.iter_batches(5, shuffle=True, seed=7)]
    assert first == [r["prompt"].tolist() for r in ds.iter_batches(5, shuffle=True, seed=7)]
    assert first != [r["prompt"].tolist() for r in ds.iter_batches(5, shuffle=True, seed=8)]


def test_map_prompts_per_prompt_values(model, tmp_path):
    prompts = make_prompts(7, seed=9)

    def fn(m, b):
        logits = m(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
        return {"last": logits[:, -1], "ids": [b.real(b.input_ids, i) for i in range(len(b))],
                "n": [int(k) for k in b.lengths]}

    ds = map_prompts(model, prompts, fn, tmp_path, batch_size=3, progress=False)
    for i, ids in enumerate(prompts):
        ref = model(torch.tensor([ids]))[0, -1]
        torch.testing.assert_close(ds[i]["last"], ref, rtol=0, atol=1e-5)
        assert ds[i]["ids"].tolist() == ids and int(ds[i]["n"]) == len(ids)
    assert ds.stack("n").tolist() == [len(p) for p in prompts]
    assert map_prompts(model, prompts, fn, tmp_path, batch_size=3, progress=False).last_run["computed"] == []
    with pytest.raises(ExperimentMismatchError, match="different function"):      # an edited fn is refused
        map_prompts(model, prompts, lambda m, b: {"n": [int(k) + 1 for k in b.lengths]}, tmp_path, progress=False)
    with pytest.raises(ValueError, match="one value per prompt"):
        map_prompts(model, prompts, lambda m, b: {"x": torch.zeros(())}, tmp_path / "bad", progress=False)


def test_strings_tokenized_by_the_models_tokenizer(tmp_path):
    from workbench import Tokenizer

    texts = ["Hello, how are you?", "The cat sat on the mat.", "A"]
    name = "blocks.1.hook_resid_post"
    ds = collect_activations("command-r-tiny", texts, [name], tmp_path, batch_size=2, progress=False)
    tok = Tokenizer.from_pretrained("command-r-tiny")
    model = HookedCommandR.from_pretrained("command-r-tiny")
    for i, text in enumerate(texts):
        ids = tok.encode(text)
        assert ds.tokens(i).tolist() == ids
        # a trained model's residual reaches ~10: compare relative to that
        torch.testing.assert_close(ds[i][name], alone(model, ids, [name])[name], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no tokenizer"):
        collect_activations(build(), texts, [name], tmp_path / "x", progress=False)


# ---------------------------------------------------------------------------------------- refusals
def test_bad_input_refused_before_any_work(model, tmp_path):
    prompts = make_prompts(6, seed=11)
    calls, handle = count_forwards(model)
    try:
        with pytest.raises(HookError, match="closest"):
            collect_activations(model, prompts, ["blocks.0.hook_resid_postt"], tmp_path / "a", progress=False)
        with pytest.raises(HookError, match="batch head q_pos k_pos"):
            collect_activations(model, prompts, ["blocks.0.attn.hook_pattern"], tmp_path / "a", progress=False)
        with pytest.raises(ValueError, match=r"inputs\[2\]: empty prompt"):
            collect_activations(model, prompts[:2] + [[]] + prompts[2:], HOOKS, tmp_path / "a", progress=False)
        with pytest.raises(ValueError, match=r"inputs\[1\]: token ids must be in \[0, vocab_size=89\)"):
            collect_activations(model, [[1], [5, 89]], HOOKS, tmp_path / "a", progress=False)
        assert calls == [] and not (tmp_path / "a").exists()

        out = tmp_path / "b"
        collect_activations(model, prompts, HOOKS, out, batch_size=2, progress=False)
        before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
        calls.clear()
        other = build(seed=5)
        other_calls, other_handle = count_forwards(other)
        with pytest.raises(ExperimentMismatchError, match="different model weights"):
            collect_activations(other, prompts, HOOKS, out, batch_size=2, progress=False)
        other_handle.remove()
        with pytest.raises(ExperimentMismatchError, match="different hook names"):
            collect_activations(model, prompts, HOOKS[:2], out, batch_size=2, progress=False)
        with pytest.raises(ExperimentMismatchError, match="different prompts"):
            collect_activations(model, prompts[1:], HOOKS, out, batch_size=2, progress=False)
        with pytest.raises(ExperimentMismatchError, match="different kind of run"):
            map_prompts(model, prompts, lambda m, b: {"n": b.lengths}, out, progress=False)
        with pytest.raises(ValueError, match="model_kwargs are for loading"):
            collect_activations(model, prompts, HOOKS, out, model_kwargs={"dtype": "float16"}, progress=False)
        assert calls == [] and other_calls == []
        assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------- resume
KILLED_RUN = textwrap.dedent("""
    import sys, time, torch
    from workbench import HookedCommandR
    from workbench.experiments import collect_activations
    model_dir, out_dir, prompts, hooks = sys.argv[1], sys.argv[2], eval(sys.argv[3]), eval(sys.argv[4])
    model = HookedCommandR.from_pretrained(model_dir)
    model.embed.register_forward_hook(lambda *a: time.sleep(0.4))     # slow enough to be killed mid-way
    collect_activations(model, prompts, hooks, out_dir, batch_size=2, shard_size=2, progress=False)
""")


def test_resume_after_killed_run_recomputes_only_missing_shards(model_dir, tmp_path):
    prompts = make_prompts(16, seed=13)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, model_dir, str(out), repr(prompts), repr(HOOKS)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while len(list(out.glob("shard-*.safetensors"))) < 2:
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the subprocess wrote no shards in time"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("shard-*.safetensors")}
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and 2 <= len(done) < len(manifest["shards"])
    with pytest.raises(ValueError, match="incomplete"):
        ActivationDataset(out)

    model = HookedCommandR.from_pretrained(model_dir)
    calls, handle = count_forwards(model)
    try:
        ds = collect_activations(model, prompts, HOOKS, out, batch_size=2, shard_size=2, progress=False)
    finally:
        handle.remove()
    done_ids = sorted(int(name[6:11]) for name in done)
    missing = sorted(set(range(len(manifest["shards"]))) - set(done_ids))
    assert ds.last_run["skipped"] == done_ids and ds.last_run["computed"] == missing
    assert len(calls) == len(missing)                     # one batch per shard of 2 prompts
    for name, stamp in done.items():
        st = (out / name).stat()
        assert (st.st_mtime_ns, st.st_ino) == stamp, f"{name} was rewritten"
    assert not list(out.glob(".shard-*"))                 # no temporary left behind
    for i, ids in enumerate(prompts):
        ref = alone(model, ids, HOOKS)
        for name in HOOKS:
            torch.testing.assert_close(ds[i][name], ref[name], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- Ray
@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'commandr-workbench[distributed]')")
    # Workers must import this checkout's workbench, not another install.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as e:                     # Ray's fixed 30 s node start-up limit on an overloaded machine
        ray.shutdown()
        pytest.skip(f"a local Ray instance could not start here: {e}")
    yield ray
    ray.shutdown()


def assert_same_dataset(a: ActivationDataset, b: ActivationDataset) -> None:
    assert len(a) == len(b) and a.names == b.names
    for i in range(len(a)):
        assert torch.equal(a.tokens(i), b.tokens(i))
        for name in a.names:
            torch.testing.assert_close(a[i][name], b[i][name], rtol=0, atol=1e-6)


def test_ray_two_workers_equal_local(model_dir, ray_session, tmp_path):
    prompts = make_prompts(12, seed=17)
    local = collect_activations(model_dir, prompts, HOOKS, tmp_path / "local", batch_size=2, shard_size=2,
                                progress=False)
    dist = collect_activations(model_dir, prompts, HOOKS, tmp_path / "ray", batch_size=2, shard_size=2,
                               backend="ray", num_workers=2, progress=False)
    assert dist.last_run["computed"] == list(range(6)) and dist.last_run["workers"] == [0, 1]
    assert_same_dataset(local, dist)
    assert local.manifest["model"] == dist.manifest["model"]
    again = collect_activations(model_dir, prompts, HOOKS, tmp_path / "ray", batch_size=2, shard_size=2,
                                backend="ray", num_workers=2, progress=False)
    assert again.last_run["computed"] == []


def test_ray_worker_killed_mid_shard_is_retried(model_dir, ray_session, tmp_path, monkeypatch):
    prompts = make_prompts(8, seed=19)
    monkeypatch.setenv("WORKBENCH_EXPERIMENTS_FAULT", "exit-mid-shard")
    dist = collect_activations(model_dir, prompts, HOOKS, tmp_path / "ray", batch_size=2, shard_size=2,
                               backend="ray", num_workers=2, progress=False)
    assert len(dist.last_run["retried"]) == 1 and dist.last_run["retried"][0]["worker"] == 0
    assert dist.last_run["computed"] == list(range(4))
    monkeypatch.delenv("WORKBENCH_EXPERIMENTS_FAULT")
    local = collect_activations(model_dir, prompts, HOOKS, tmp_path / "local", batch_size=2, shard_size=2,
                                progress=False)
    assert_same_dataset(local, dist)


# ---------------------------------------------------------------------------------------- Ray's scheduling, in-process
class FakeRay:
    """The slice of Ray's API the backend uses, run synchronously in this process: tests the driver's scheduling
    and retries where a Ray instance cannot start (actors are plain objects; a dead actor raises RayActorError)."""

    class exceptions:
        class RayActorError(Exception):
            pass

        class RayTaskError(Exception):
            def __init__(self, cause):
                super().__init__(str(cause))
                self.cause = cause

            def as_instanceof_cause(self):
                return self.cause

    class Died(Exception):
        pass

    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return {"CPU": 2.0}

    def remote(self, **options):
        fake = self

        class ActorClass:
            def __init__(self, cls):
                self.cls = cls

            def remote(self, *args):
                return Actor(fake, len(fake.calls), self.cls(*args))

        return ActorClass

    def put(self, value):
        return value

    def get(self, refs):
        return [r.result() for r in refs] if isinstance(refs, list) else refs.result()

    def wait(self, refs, num_returns=1, timeout=None):
        return refs[:num_returns], refs[num_returns:]

    def kill(self, actor):
        actor.dead = True

    def shutdown(self):
        pass


class Ref:
    def __init__(self, value=None, error=None):
        self.value, self.error = value, error

    def result(self):
        if self.error is not None:
            raise self.error
        return self.value


class Actor:
    def __init__(self, fake, index, obj):
        self.fake, self.obj, self.dead = fake, obj, False

    def __getattr__(self, method):
        actor = self

        class Method:
            def remote(self, *args):
                if actor.dead:
                    return Ref(error=FakeRay.exceptions.RayActorError("actor is dead"))
                actor.fake.calls.append((id(actor), method))
                try:
                    return Ref(getattr(actor.obj, method)(*args))
                except FakeRay.Died:
                    actor.dead = True
                    return Ref(error=FakeRay.exceptions.RayActorError("worker exited mid-shard"))
                except Exception as e:
                    return Ref(error=FakeRay.exceptions.RayTaskError(e))

        return Method()


def test_ray_scheduling_and_retry_in_process(model_dir, tmp_path, monkeypatch):
    from workbench.experiments import ray_backend

    def die(_n):
        raise FakeRay.Died

    fake = FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(ray_backend, "_die", die)
    monkeypatch.setenv("WORKBENCH_EXPERIMENTS_FAULT", "exit-mid-shard")
    prompts = make_prompts(10, seed=23)
    dist = collect_activations(model_dir, prompts, HOOKS, tmp_path / "ray", batch_size=2, shard_size=2,
                               backend="ray", num_workers=2, progress=False)
    assert dist.last_run["retried"] == [{"shard": 4, "worker": 0, "error": "RayActorError"}]   # longest shard first
    assert dist.last_run["computed"] == list(range(5)) and dist.last_run["workers"] == [1]
    monkeypatch.delenv("WORKBENCH_EXPERIMENTS_FAULT")
    local = collect_activations(model_dir, prompts, HOOKS, tmp_path / "local", batch_size=2, shard_size=2,
                                progress=False)
    assert_same_dataset(local, dist)
    assert local.manifest["model"] == dist.manifest["model"]

    # an error inside fn is the user's: raised at once, not retried
    with pytest.raises(ZeroDivisionError):
        map_prompts(model_dir, prompts, lambda m, b: {"x": 1 / 0}, tmp_path / "err", backend="ray", num_workers=2,
                    progress=False)
    # a loaded model cannot travel to workers
    with pytest.raises(ValueError, match="pass its name or path"):
        collect_activations(build(), prompts, HOOKS, tmp_path / "x", backend="ray", progress=False)
