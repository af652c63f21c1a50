"""Hooks are scoped to a call: concurrent calls on one model from several threads each see only
their own hooks and their own hook context; model-wide hooks (HookPoint.add_hook) reach every call;
backward hooks fire wherever autograd runs them."""

import threading
import time

import pytest
import torch

from workbench import CommandRConfig, HookedCommandR
from workbench.hook_points import generation_step
from workbench.kv_cache import KVCache

CFG = dict(vocab_size=101, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64, use_qk_norm=True)
N = 200


@pytest.fixture(scope="module")
def model():
    return HookedCommandR.from_config(CommandRConfig(**CFG), seed=0)


def _ids(pos=6, seed=0, batch=1):
    return torch.randint(1, 101, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _no_hooks(model):
    return not any(hp.has_hooks for hp in model.hook_dict.values())


def _zero_head(z, hook):
    time.sleep(0)                       # give the other thread a chance to run mid-forward
    z = z.clone()
    z[:, :, 1] = 0
    return z


def _shift(resid, hook):
    time.sleep(0)
    return resid + 0.5


def _run_threads(*targets):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised on the main thread
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]


@torch.no_grad()
def test_two_threads_different_hooks_each_equal_solo(model):
    ids_a, ids_b = _ids(seed=1), _ids(seed=2)
    hooks_a = [("blocks.0.attn.hook_z", _zero_head)]
    hooks_b = [("blocks.1.hook_resid_post", _shift), ("blocks.0.hook_resid_pre", _shift)]
    solo_a = model.run_with_hooks(ids_a, fwd_hooks=hooks_a)
    solo_b = model.run_with_hooks(ids_b, fwd_hooks=hooks_b)
    assert not torch.equal(solo_a, model(ids_a)) and not torch.equal(solo_b, model(ids_b))
    start = threading.Barrier(2)
    got = {"a": [], "b": []}

    def worker(key, ids, hooks):
        def run():
            start.wait()
            for _ in range(N):
                got[key].append(model.run_with_hooks(ids, fwd_hooks=hooks))
        return run

    _run_threads(worker("a", ids_a, hooks_a), worker("b", ids_b, hooks_b))
    assert len(got["a"]) == len(got["b"]) == N
    bad_a = sum(not torch.equal(x, solo_a) for x in got["a"])
    bad_b = sum(not torch.equal(x, solo_b) for x in got["b"])
    assert (bad_a, bad_b) == (0, 0)
    assert _no_hooks(model)


@torch.no_grad()
def test_plain_forward_unaltered_while_other_thread_zeroes(model):
    ids = _ids(seed=3)
    ref = model(ids)
    done = threading.Event()
    zeroed = []

    def zero_everything():
        zero = [(lambda n: n.endswith("hook_resid_post"), lambda x, hook: x * 0)]
        while not done.is_set():
            zeroed.append(model.run_with_hooks(ids, fwd_hooks=zero))

    worker = threading.Thread(target=zero_everything)
    worker.start()
    try:
        plain = [model(ids) for _ in range(N)]
        while not zeroed:          # the other thread really ran (at least once) meanwhile
            time.sleep(0.01)
    finally:
        done.set()
        worker.join(60)
    assert sum(not torch.equal(p, ref) for p in plain) == 0
    assert zeroed and all(not torch.equal(z, ref) for z in zeroed)
    assert _no_hooks(model)


@torch.no_grad()
def test_generate_with_steering_on_thread_while_main_runs_cache(model):
    prompt, other = _ids(pos=5, seed=4), _ids(pos=9, seed=5, batch=2)
    v = torch.randn(48, generator=torch.Generator().manual_seed(6))

    def steer(resid, hook):
        time.sleep(0)
        if hook.ctx.step is not None and hook.ctx.step >= 1:
            return resid + v
        return None

    kwargs = dict(max_new_tokens=12, fwd_hooks=[("blocks.0.hook_resid_post", steer)], eos_token_id=[])
    solo_gen = model.generate(prompt, **kwargs)
    assert not torch.equal(solo_gen, model.generate(prompt, max_new_tokens=12, eos_token_id=[]))
    solo_logits, solo_cache = model.run_with_cache(other)
    results = []

    def gen():
        for _ in range(5):
            results.append(model.generate(prompt, **kwargs))

    worker = threading.Thread(target=gen)
    worker.start()
    caches = []
    try:
        while worker.is_alive() or len(caches) < 3:
            caches.append(model.run_with_cache(other))
    finally:
        worker.join(120)
    assert len(results) == 5 and all(torch.equal(r, solo_gen) for r in results)
    for logits, cache in caches:
        assert torch.equal(logits, solo_logits)
        assert set(cache.keys()) == set(solo_cache.keys())
        for name in ("blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_result"):
            assert torch.equal(cache[name], solo_cache[name]), name
    assert _no_hooks(model) and model.hook_ctx.step is None


def test_generation_view_run_async_while_main_runs_cache():
    pytest.importorskip("anywidget")
    pytest.importorskip("ipywidgets")
    from workbench import Tokenizer
    from workbench.widgets import GenerationView

    model = HookedCommandR.from_pretrained("command-r-tiny", progress=False)
    tok = Tokenizer.from_pretrained("command-r-tiny")
    v = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0)).to(model.dtype)

    def steer(resid, hook):
        return resid + v if hook.ctx.step is not None and hook.ctx.step >= 1 else None

    kwargs = dict(max_new_tokens=5, attention_layers=[0, 3], fwd_hooks=[("blocks.1.hook_resid_post", steer)],
                  eos_token_id=[])
    solo = GenerationView(model, tok, "The cat sat on", **kwargs).run()
    other = torch.tensor([tok.encode("A completely different and longer prompt about dogs")])
    with torch.no_grad():
        solo_logits, solo_cache = model.run_with_cache(other)
    view = GenerationView(model, tok, "The cat sat on", **kwargs)
    view.run_async()
    caches = []
    with torch.no_grad():
        while view._thread.is_alive() or not caches:
            caches.append(model.run_with_cache(other))
    assert torch.equal(view.wait(60), solo)
    for logits, cache in caches:
        assert torch.equal(logits, solo_logits)
        assert torch.equal(cache["pattern", 3], solo_cache["pattern", 3])
    assert _no_hooks(model)


@torch.no_grad()
def test_hook_ctx_is_per_call(model):
    """A cached decode step on one thread and plain forwards on another: each hook sees its own ctx."""
    prompt = _ids(pos=7, seed=7)
    kv = KVCache.for_model(model)
    model(prompt, kv_cache=kv)
    start = threading.Barrier(2)
    seen = {"decode": set(), "plain": set()}

    def record(key):
        def fn(x, hook):
            time.sleep(0)
            seen[key].add((hook.ctx.step, hook.ctx.past_len, tuple(hook.ctx.positions[0].tolist()), hook.layer()))
        return fn

    def decode():
        start.wait()
        for i in range(50):
            with generation_step(i + 1):
                model.run_with_hooks(prompt[:, :1], kv_cache=kv.clone(),
                                     fwd_hooks=[("blocks.1.hook_resid_pre", record("decode"))])

    def plain():
        start.wait()
        for _ in range(50):
            model.run_with_hooks(prompt, fwd_hooks=[("blocks.1.hook_resid_pre", record("plain"))])

    _run_threads(decode, plain)
    assert seen["plain"] == {(None, 0, tuple(range(7)), 1)}
    assert seen["decode"] == {(i + 1, 7, (7,), 1) for i in range(50)}
    assert model.hook_ctx.step is None and model.hook_ctx.positions is None


def test_hook_layer_is_an_int_and_callable(model):
    hp = model.hook_dict["blocks.1.attn.hook_z"]
    assert hp.layer == 1 and hp.layer() == 1 and isinstance(hp.layer, int) and hp.layer + 1 == 2
    assert model.hook_dict["hook_embed"].layer is None


def test_scoped_hooks_invisible_to_other_threads(model):
    inside, outside = {}, {}
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: None)]):
        inside["has"] = model.hook_dict["blocks.0.hook_resid_post"].has_hooks
        t = threading.Thread(target=lambda: outside.update(has=model.hook_dict["blocks.0.hook_resid_post"].has_hooks))
        t.start()
        t.join()
    assert inside["has"] and not outside["has"] and _no_hooks(model)


def test_model_wide_add_hook_reaches_other_threads(model):
    ids = _ids(seed=8)
    with torch.no_grad():
        ref = model(ids)
    remove = model.hook_dict["blocks.0.hook_mlp_out"].add_hook(lambda x, hook: x * 0)
    try:
        out = []
        t = threading.Thread(target=lambda: out.append(model(ids)))
        t.start()
        t.join()
        assert not torch.equal(out[0], ref)
    finally:
        remove()
    assert torch.equal(model(ids), ref) and _no_hooks(model)


def _loss(model, ids):
    return model(ids)[:, -1].float().logsumexp(-1).sum()


@pytest.mark.parametrize("where", ["same thread", "other thread"])
def test_backward_hooks_fire(model, where):
    """A scoped backward hook fires whether autograd runs it on this thread or another one, and
    sees the context of the forward that registered it; after the block it does nothing."""
    ids = _ids(seed=9)
    grads = {}

    def record(g, hook):
        grads[hook.name] = (g.clone(), hook.ctx.positions.clone(), hook.layer, threading.current_thread().name)

    with model.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", record)]):
        resid = {}
        with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: resid.update(x=x))]):
            loss = _loss(model, ids)
        if where == "same thread":
            loss.backward()
        else:
            t = threading.Thread(target=loss.backward, name="backward-thread")
            t.start()
            t.join()
    g, positions, layer, thread = grads["blocks.1.hook_resid_pre"]
    assert g.shape == resid["x"].shape and g.abs().sum() > 0
    assert positions.tolist() == [list(range(6))] and layer == 1
    assert (thread == "backward-thread") == (where == "other thread")
    # the hook left on an old graph does nothing once its block ended
    grads.clear()
    with model.hooks(bwd_hooks=[("blocks.1.hook_resid_pre", record)]):
        loss = _loss(model, ids)
    loss.backward()
    assert grads == {} and _no_hooks(model)


def test_backward_hook_value_matches_autograd(model):
    ids = _ids(seed=10)
    captured = {}
    with model.hooks(fwd_hooks=[("blocks.1.hook_resid_pre", lambda x, hook: captured.update(x=x))],
                     bwd_hooks=[("blocks.1.hook_resid_pre", lambda g, hook: captured.update(g=g.clone()))]):
        loss = _loss(model, ids)
        (want,) = torch.autograd.grad(loss, captured["x"], retain_graph=True)
        loss.backward()
    assert torch.equal(captured["g"], want)


def test_model_wide_backward_hook_fires_on_other_thread(model):
    ids = _ids(seed=11)
    seen = []
    remove = model.hook_dict["blocks.0.hook_resid_post"].add_hook(lambda g, hook: seen.append(hook.name), dir="bwd")
    try:
        loss = _loss(model, ids)
        t = threading.Thread(target=loss.backward)
        t.start()
        t.join()
    finally:
        remove()
    assert seen == ["blocks.0.hook_resid_post"] and _no_hooks(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (autograd's device threads)")
def test_backward_hooks_fire_on_cuda_autograd_threads():
    """On a GPU autograd runs backward hooks on its own device thread, where no scope is set: the hook
    registered during the forward still fires, with that forward's context."""
    model = HookedCommandR.from_config(CommandRConfig(**CFG), seed=0).cuda()
    ids = _ids(seed=12).cuda()
    seen = {}

    def record(g, hook):
        seen.update(thread=threading.current_thread().name, positions=hook.ctx.positions.tolist(), g=g.clone())

    with model.hooks(bwd_hooks=[("blocks.0.hook_resid_post", record)],
                     fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: seen.update(x=x))]):
        loss = _loss(model, ids)
        (want,) = torch.autograd.grad(loss, seen["x"], retain_graph=True)
        loss.backward()
    assert torch.equal(seen["g"], want) and seen["positions"] == [list(range(6))]
    assert _no_hooks(model)
