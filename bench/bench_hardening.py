"""Costs of the hardening checks (issue 15, items 1, 4, 9), as ratios measured side by side.

* item 9: ``run_with_cache`` of every hook stores views while only recorders listen, and copies each
  entry once a hook that may edit tensors in place is attached. Rows: forward; run_with_cache (views);
  run_with_cache + a user hook that may edit (copies); the same hook marked ``records_only`` (views).
* item 1: ``weights_fingerprint`` per tensor, across tensor sizes (sampled slices: flat in size), and the
  estimate for Command-R 35B (its tensor count from the preset, built on meta).
* item 4: ``MappedFiles.check`` (one ``os.stat`` per weight file, before every forward) against a
  one-token decode step of the bundled model.

Run: ``python bench/bench_hardening.py`` (CPU; prints the machine's core count).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _limits import machine_line, timeit_interleaved  # noqa: E402
from workbench import CommandRConfig, HookedCommandR, KVCache  # noqa: E402
from workbench.fingerprint import weights_fingerprint  # noqa: E402
from workbench.hook_points import records_only  # noqa: E402
from workbench.mapped_files import MappedFiles  # noqa: E402


def timeit(fn, repeat: int = 7, number: int = 1) -> float:
    """Median seconds per call over ``repeat`` rounds of ``number`` calls (one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t0) / number)
    return statistics.median(times)


def bench_cache_copies() -> None:
    cfg = CommandRConfig(d_model=512, n_layers=4, n_heads=8, n_kv_heads=8, d_mlp=1536, vocab_size=4096)
    model = HookedCommandR.from_config(cfg, seed=0).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 256), generator=torch.Generator().manual_seed(0))

    def edits(x, hook):          # a hook that could edit in place (unmarked): the cache copies
        return None

    reads = records_only(lambda x, hook: None)

    with torch.no_grad():
        _, full = model.run_with_cache(ids)
        entries = [full[k] for k in full]              # deferred entries computed once, here
        rows = {
            "forward": lambda: model(ids),
            "run_with_cache, every hook (views)": lambda: model.run_with_cache(ids),
            "run_with_cache + editing hook (copies)": lambda: model.run_with_cache(
                ids, fwd_hooks=[("blocks.3.hook_resid_post", edits)]),
            "run_with_cache + records_only hook (views)": lambda: model.run_with_cache(
                ids, fwd_hooks=[("blocks.3.hook_resid_post", reads)]),
            "clone of every entry alone (the copies' cost)": lambda: [e.clone() for e in entries],
        }
        t = timeit_interleaved(rows, repeat=9, warmup=1)
    base = t["forward"]
    print(f"\n-- item 9: cache copies (d_model {cfg.d_model}, {cfg.n_layers} layers, pos 256, "
          f"{len(model.hook_dict)} hooks; interleaved, min / median)")
    for k, v in t.items():
        print(f"{k:<48} {v.min * 1e3:8.2f} / {v.median * 1e3:8.2f} ms  x{v.min / base.min:5.2f} / "
              f"x{v.median / base.median:5.2f} forward")


def bench_fingerprint() -> None:
    print("\n-- item 1: weights_fingerprint per tensor (sampled slices)")
    per = {}
    for numel in (10**3, 10**5, 10**7, 6 * 10**7):
        t = torch.randn(numel).to(torch.bfloat16)
        per[numel] = timeit(lambda: weights_fingerprint({"w": t}), number=20)
        print(f"{numel:>12,d} elements (bf16)  {per[numel] * 1e6:8.1f} us")
    with torch.device("meta"):
        big = HookedCommandR(CommandRConfig.from_preset("command-r-v01"))
    n = len(big.state_dict())
    tiny = HookedCommandR.from_pretrained("command-r-tiny", progress=False)
    t_tiny = timeit(lambda: weights_fingerprint(tiny), number=5)
    print(f"bundled command-r-tiny ({len(tiny.state_dict())} tensors): {t_tiny * 1e3:.2f} ms")
    worst = max(per.values())
    print(f"Command-R 35B: {n} tensors x {worst * 1e6:.0f} us (slowest size above) = ~{n * worst * 1e3:.0f} ms "
          "per save/load with weights in memory (offloaded weights add one page read per sampled slice)")


def bench_mapped_check() -> None:
    print("\n-- item 4: MappedFiles.check before each forward")
    tiny = HookedCommandR.from_pretrained("command-r-tiny", progress=False)
    ids = torch.randint(3, 200, (1, 32), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        files = []
        for i in range(15):                    # Command-R 35B ships 15 shards
            files.append(os.path.join(d, f"model-{i:05d}.safetensors"))
            open(files[-1], "wb").close()
        one, fifteen = MappedFiles(files[:1]), MappedFiles(files)
        t1 = timeit(one.check, number=200)
        t15 = timeit(fifteen.check, number=200)
        t15p = timeit(MappedFiles(by_path=files).check, number=200)
    with torch.no_grad():
        cache = KVCache.for_model(tiny)
        tiny(ids, kv_cache=cache)

        def step():
            c = cache.clone()
            tiny(ids[:, :1], kv_cache=c)

        t_step = timeit(step, number=5)
    print(f"check, 1 mapped file (fstat): {t1 * 1e6:.1f} us; 15: {t15 * 1e6:.1f} us; 15 by path (stat): "
          f"{t15p * 1e6:.1f} us")
    print(f"bundled model decode step (incl. cache clone): {t_step * 1e3:.2f} ms -> check of 15 files = "
          f"{t15 / t_step * 100:.2f}% of it")


def main() -> int:
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    print("== bench_hardening: costs of the hardening checks (issue 15) ==")
    print(machine_line())
    bench_cache_copies()
    bench_fingerprint()
    bench_mapped_check()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
