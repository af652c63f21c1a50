"""Experiments over a dataset: batched ``collect_activations`` vs a hand-written loop; Ray 2 workers vs local 1;
peak RSS against dataset size.

A random "small" Command-R (d_model 512, 4 layers, 8 heads, 2 kv heads, d_mlp 1408, vocab 8000, fp32) is saved to
a temporary folder; the dataset is ``--prompts`` random prompts of 8..96 tokens (uniform). Recorded: every
layer's ``hook_resid_post``.

Tables:

1. **tokens/s**: ``collect_activations(model, prompts, hooks, out_dir, batch_size=16)`` (length-bucketed
   left-padded batches, forward stopped after the last hook, shards written to disk) against the loop people
   write by hand: ``for ids in prompts: run_with_cache(ids[None], names_filter=hooks)`` keeping every cache in a
   list (nothing written). Rounds interleaved; min and median.
2. **Ray**: ``backend="ray", num_workers=2`` (each actor 1 torch thread) against ``backend="local"`` with 1
   thread, same shards. Two times for Ray: the whole call (Ray start, actors loading the model) and the shard
   phase alone (``ds.last_run["seconds"]``). Skipped with the reason when Ray is missing or cannot start.
3. **peak RSS**: each in a fresh subprocess, peak ``ru_maxrss`` minus the RSS held after loading the model, for
   ``collect_activations`` on N/4 and N prompts (should stay flat: one shard in memory) and for the hand-written
   loop (grows with N).

Run::

    python bench/bench_experiments.py                  # 512 prompts, 2 rounds
    python bench/bench_experiments.py --tiny --repeat 1  # smoke test
    python bench/bench_experiments.py --skip-ray
    python bench/bench_experiments.py --rss-only --skip-limits
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

SMALL = dict(vocab_size=8000, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, d_mlp=1408, use_qk_norm=True,
             pad_token_id=0)
TINY = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=128, use_qk_norm=True,
            pad_token_id=0)


def build(folder: str, tiny: bool) -> str:
    from workbench import CommandRConfig, HookedCommandR

    HookedCommandR.from_config(CommandRConfig(**(TINY if tiny else SMALL)), seed=0).save_pretrained(folder)
    return folder


def make_prompts(n: int, vocab: int, lo: int = 8, hi: int = 96, seed: int = 0) -> list:
    import torch

    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(1, vocab, (k,), generator=g).tolist() for k in lengths]


def hooks_of(n_layers: int) -> list:
    return [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]   # no vocabulary helper on main yet


def hand_loop(model, prompts, hooks) -> list:
    import torch

    kept = []
    with torch.no_grad():
        for ids in prompts:
            _, cache = model.run_with_cache(torch.tensor([ids]), names_filter=hooks)
            kept.append({h: cache[h][0] for h in hooks})
    return kept


# ------------------------------------------------------------------------------------- RSS worker
def rss_worker(mode: str, folder: str, n: int, out: str) -> None:
    import resource

    import torch

    from workbench import HookedCommandR
    from workbench.experiments import collect_activations

    torch.set_num_threads(1)
    model = HookedCommandR.from_pretrained(folder, progress=False)
    prompts = make_prompts(n, model.cfg.vocab_size)
    hooks = hooks_of(model.cfg.n_layers)
    hand_loop(model, prompts[:4], hooks)                 # warm allocator and kernels for both modes
    before = current_rss_kib()      # now, not the peak: loading the model peaks above what it then holds
    if mode == "collect":
        collect_activations(model, prompts, hooks, out, batch_size=16, progress=False)
        kept = None
    else:
        kept = hand_loop(model, prompts, hooks)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stored = sum(len(p) for p in prompts) * model.cfg.d_model * 4 * len(hooks)
    print(json.dumps({"rise_mib": (after - before) / 1024, "stored_mib": stored / 2**20, "kept": kept is not None}))


def current_rss_kib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024


def measure_rss(mode: str, folder: str, n: int) -> dict:
    out = tempfile.mkdtemp(prefix="bench-exp-rss-")
    try:
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")])}
        res = subprocess.run([sys.executable, __file__, "--rss-worker", mode, folder, str(n), out],
                             capture_output=True, text=True, env=env, check=True)
        return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--prompts", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-ray", action="store_true")
    ap.add_argument("--skip-limits", action="store_true")
    ap.add_argument("--rss-only", action="store_true", help="only the peak-RSS table")
    ap.add_argument("--ray-only", action="store_true", help="only the Ray table")
    ap.add_argument("--rss-worker", nargs=4, metavar=("MODE", "FOLDER", "N", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_worker:
        mode, folder, n, out = args.rss_worker
        return rss_worker(mode, folder, int(n), out)

    import torch

    from _limits import machine_line, measure_limits, print_limits, print_table
    from workbench import HookedCommandR

    torch.set_num_threads(args.threads)
    n = args.prompts or (48 if args.tiny else 512)
    if args.skip_limits:
        print(f"machine: {machine_line()}")
    else:
        print_limits(measure_limits(threads=args.threads))
    work = tempfile.mkdtemp(prefix="bench-exp-")
    try:
        folder = build(os.path.join(work, "model"), args.tiny)
        model = HookedCommandR.from_pretrained(folder, progress=False)
        prompts = make_prompts(n, model.cfg.vocab_size)
        hooks = hooks_of(model.cfg.n_layers)
        tokens = sum(map(len, prompts))
        print(f"model d_model {model.cfg.d_model}, {model.cfg.n_layers} layers, vocab {model.cfg.vocab_size}; "
              f"{n} prompts, {tokens} tokens; hooks: resid_post x {len(hooks)}; threads {args.threads}\n")

        if not args.rss_only and not args.ray_only:
            speed_table(args, model, prompts, hooks, tokens, work)
        if not args.rss_only and not args.skip_ray:
            ray_table(folder, model, prompts, hooks, tokens, work)
        if args.ray_only:
            return
        rss_rows = []
        for mode in ("collect", "loop"):
            for size in (n // 4, n):
                r = measure_rss(mode, folder, size)
                rss_rows.append([mode, size, f"{r['stored_mib']:.0f}", f"{r['rise_mib']:.0f}"])
        print("\npeak RSS rise over the loaded model (fresh process each):")
        print_table(rss_rows, ["mode", "prompts", "activations MiB", "peak RSS rise MiB"])
    finally:
        shutil.rmtree(work, ignore_errors=True)


def speed_table(args, model, prompts, hooks, tokens, work) -> None:
    from _limits import print_table, timeit_interleaved
    from workbench.experiments import collect_activations

    runs = iter(range(10**6))

    def batched():
        out = os.path.join(work, f"run{next(runs)}")
        collect_activations(model, prompts, hooks, out, batch_size=16, progress=False)
        shutil.rmtree(out)

    loop = "hand loop: run_with_cache per prompt (in RAM)"
    t = timeit_interleaved({"collect_activations (batch 16, to disk)": batched,
                            loop: lambda: hand_loop(model, prompts, hooks)}, repeat=args.repeat, warmup=0)
    rows = [[name, f"{tokens / tm.min:,.0f}", f"{tokens / tm.median:,.0f}", f"{t[loop].min / tm.min:.2f}x"]
            for name, tm in t.items()]
    print_table(rows, ["contender", "tokens/s (best)", "tokens/s (median)", "speed-up vs loop"])


def ray_table(folder, model, prompts, hooks, tokens, work) -> None:
    from _limits import print_table
    from workbench.experiments import collect_activations

    try:
        import ray
    except ImportError:
        print("\nRay: skipped, not installed (pip install 'commandr-workbench[distributed]')")
        return
    start = time.perf_counter()
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as e:
        ray.shutdown()
        print(f"\nRay: skipped, a local instance could not start here: {str(e)[:120]}")
        return
    started = time.perf_counter() - start
    try:
        t0 = time.perf_counter()
        local = collect_activations(model, prompts, hooks, os.path.join(work, "ray-local"), batch_size=16,
                                    progress=False)
        local_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dist = collect_activations(folder, prompts, hooks, os.path.join(work, "ray-2"), batch_size=16,
                                   backend="ray", num_workers=2, model_kwargs={"progress": False}, progress=False)
        ray_s = time.perf_counter() - t0
        same = all(torch_equal(local[i][h], dist[i][h]) for i in range(len(prompts)) for h in hooks)
    finally:
        ray.shutdown()
    shard_s = dist.last_run["seconds"]
    print(f"\nRay (local instance, 2 CPUs; ray.init took {started:.1f} s, not counted below); results identical: {same}")
    print_table([["local, 1 process, 1 thread", f"{local_s:.1f}", f"{local.last_run['seconds']:.1f}",
                  f"{tokens / local.last_run['seconds']:,.0f}", "1.00x"],
                 ["ray, 2 workers x 1 thread", f"{ray_s:.1f}", f"{shard_s:.1f}", f"{tokens / shard_s:,.0f}",
                  f"{local.last_run['seconds'] / shard_s:.2f}x"]],
                ["backend", "whole call s", "shard phase s", "tokens/s (shards)", "scaling"])


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


if __name__ == "__main__":
    main()
