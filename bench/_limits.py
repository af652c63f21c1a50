"""The machine's physical limits, and the timing/printing helpers every ``bench/bench_*.py`` shares.

A benchmark number means little on its own on a shared 2-core machine, so each bench prints, above
its table, what this machine can do right now:

* memory read bandwidth (GB/s): ``x.sum()`` over a tensor far larger than the caches, and copy
  bandwidth (``dst.copy_(src)``, counted as bytes read + bytes written);
* fp32 matmul rate (GFLOP/s): square ``a @ b`` at the sizes a mid-size forward uses, 2·n³ FLOPs;
* matrix-vector rate (GFLOP/s, and the GB/s it implies): ``W @ x`` with a weight far larger than the
  caches, the shape of one decode step — memory-bound, so it should track the read bandwidth.

Every measurement is min-of-N (the least disturbed run) with the median alongside; the gap between
the two is the noise from other processes. Everything runs with ``torch.set_num_threads(threads)``.

Example::

    from _limits import measure_limits, print_limits, timeit, print_table

    lim = measure_limits(threads=2)
    print_limits(lim)
    t = timeit(lambda: model(tokens), repeat=5, warmup=1)
    print_table([["ours", f"{t.min * 1e3:.1f}"]], ["contender", "min ms"])
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch


# ---------------------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Wall-clock times (and CPU times of the process that did the work) of one contender, seconds."""

    times: List[float] = field(default_factory=list)
    cpu_times: List[float] = field(default_factory=list)

    @property
    def cpu_min(self) -> float:
        """Least CPU time (all threads) of one repetition: less sensitive to other processes than
        wall time, but inflated by thread-pool spinning when the cores are oversubscribed."""
        return min(self.cpu_times) if self.cpu_times else float("nan")

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(median - min) / min: how much the other processes on the machine disturbed this run."""
        return self.median / self.min - 1.0

    def ms(self) -> str:
        """``"612.3 / 640.1"``: min / median in milliseconds."""
        return f"{self.min * 1e3:.1f} / {self.median * 1e3:.1f}"


@dataclass
class Measured:
    """What a contender may return to report its own times (e.g. one that runs in a subprocess,
    so pipe latency and the other process's scheduling are not counted)."""

    wall: float
    cpu: float


def _run_once(fn: Callable[[], object], out: "Timing") -> None:
    c0, t0 = time.process_time(), time.perf_counter()
    ret = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if isinstance(ret, Measured):
        wall, cpu = ret.wall, ret.cpu
    out.times.append(wall)
    out.cpu_times.append(cpu)


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times timed; returns a ``Timing``.

    ``Timing.min`` and ``Timing.median`` are in seconds.

    Example::

        t = timeit(lambda: torch.randn(512, 512) @ torch.randn(512, 512), repeat=5)
        t.min, t.median
    """
    if repeat < 1:
        raise ValueError(f"timeit: repeat must be >= 1, got {repeat}")
    for _ in range(warmup):
        fn()
    out = Timing()
    for _ in range(repeat):
        _run_once(fn, out)
    return out


def timeit_interleaved(contenders: Dict[str, Callable[[], object]], repeat: int = 5,
                       warmup: int = 1) -> Dict[str, Timing]:
    """Time several contenders round-robin, so a burst of load from another process hits all of
    them alike instead of whichever happened to run then. Each round starts one contender later
    (A B C, B C A, C A B, ...) so none is always first after the garbage collection.

    Example::

        res = timeit_interleaved({"ours": lambda: ours(x), "hf": lambda: hf(x)}, repeat=7)
        res["ours"].min / res["hf"].min
    """
    if repeat < 1:
        raise ValueError(f"timeit_interleaved: repeat must be >= 1, got {repeat}")
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    names = list(contenders)
    out = {name: Timing() for name in names}
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            _run_once(contenders[name], out[name])
    return out


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of a's time / b's time in the same round of ``timeit_interleaved``.

    The two ran seconds apart, under nearly the same load, so this ratio is the most robust one on
    a busy machine (min/min can pair a quiet run of one with a loaded run of the other).
    """
    if len(a.times) != len(b.times):
        raise ValueError(f"paired_ratio: {len(a.times)} vs {len(b.times)} repetitions; time them interleaved")
    return statistics.median(x / y for x, y in zip(a.times, b.times))


def square_matmul(n: int = 2048, dtype: torch.dtype = torch.float32):
    """(fn, flops): a zero-argument square ``[n n] @ [n n]`` matmul to time alongside contenders,
    so the matmul rate is re-measured in every round under the same load as they are."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=dtype)
    b = torch.randn(n, n, generator=gen, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    return (lambda: torch.matmul(a, b, out=c)), 2.0 * n**3


# ---------------------------------------------------------------------------------------- limits
@dataclass
class Limits:
    """What the machine measured; rates are min-of-N based (best observed), medians alongside."""

    threads: int
    read_gbs: float                 # memory read bandwidth, GB/s (best)
    read_gbs_median: float
    copy_gbs: float                 # copy bandwidth, bytes read + written, GB/s (best)
    matmul_gflops: Dict[int, float]         # n -> GFLOP/s for square fp32 n x n @ n x n (best)
    matmul_gflops_median: Dict[int, float]
    matvec_gflops: float            # fp32 [n n] @ [n] GFLOP/s (best)
    matvec_gbs: float               # the weight bytes per second that implies

    @property
    def matmul_peak(self) -> float:
        """The best square-gemm rate over the sizes measured: the roofline for compute-bound work."""
        return max(self.matmul_gflops.values())


def memory_bandwidth(mib: int = 512, repeat: int = 7) -> tuple:
    """(read GB/s best, read GB/s median, copy GB/s best) over an fp32 tensor of ``mib`` MiB."""
    n = mib * 2**20 // 4
    x = torch.ones(n, dtype=torch.float32)
    y = torch.empty_like(x)
    read = timeit(lambda: x.sum(), repeat=repeat, warmup=1)
    copy = timeit(lambda: y.copy_(x), repeat=repeat, warmup=1)
    nbytes = x.numel() * 4
    return nbytes / read.min / 1e9, nbytes / read.median / 1e9, 2 * nbytes / copy.min / 1e9


def matmul_rate(n: int, repeat: int = 5, dtype: torch.dtype = torch.float32) -> Timing:
    """Timing of a square ``[n n] @ [n n]`` matmul (2·n³ FLOPs)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=dtype)
    b = torch.randn(n, n, generator=gen, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    return timeit(lambda: torch.matmul(a, b, out=c), repeat=repeat, warmup=2)


def gemm_gflops(m: int, k: int, n: int, repeat: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Best GFLOP/s of ``[m k] @ [k n]`` — e.g. one projection of a forward over m tokens."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen, dtype=dtype)
    b = torch.randn(k, n, generator=gen, dtype=dtype)
    t = timeit(lambda: a @ b, repeat=repeat, warmup=2)
    return 2 * m * k * n / t.min / 1e9


def matvec_rate(n: int = 8192, repeat: int = 9) -> tuple:
    """(GFLOP/s, weight GB/s) of fp32 ``[n n] @ [n]``, the memory-bound shape of a decode step."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=gen)
    x = torch.randn(n, generator=gen)
    t = timeit(lambda: torch.mv(w, x), repeat=repeat, warmup=2)
    return 2 * n * n / t.min / 1e9, n * n * 4 / t.min / 1e9


def measure_limits(threads: Optional[int] = 2, sizes: Sequence[int] = (1024, 2048),
                   quick: bool = False) -> Limits:
    """Measure this machine's bandwidth and matmul/matvec rates with ``threads`` torch threads.

    ``quick=True`` uses small tensors and one repetition (for smoke tests; numbers meaningless).

    Example::

        lim = measure_limits(threads=2)
        lim.read_gbs, lim.matmul_peak
    """
    if threads is not None:
        torch.set_num_threads(threads)
    rep = 1 if quick else 7
    read, read_med, copy = memory_bandwidth(mib=16 if quick else 512, repeat=rep)
    sizes = (128,) if quick else tuple(sizes)
    mm, mm_med = {}, {}
    for n in sizes:
        t = matmul_rate(n, repeat=rep)
        mm[n], mm_med[n] = 2 * n**3 / t.min / 1e9, 2 * n**3 / t.median / 1e9
    mv_flops, mv_gbs = matvec_rate(512 if quick else 8192, repeat=rep)
    return Limits(torch.get_num_threads(), read, read_med, copy, mm, mm_med, mv_flops, mv_gbs)


def machine_line() -> str:
    """One line naming the CPU, core count, torch version and thread count, for table headers."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = "load avg %.2f %.2f %.2f" % os.getloadavg()
    except OSError:
        load = "load avg n/a"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {load}")


def print_limits(lim: Limits) -> None:
    """Print the physical limits block that heads every bench table."""
    print(f"machine: {machine_line()}")
    print(f"memory read bandwidth: {lim.read_gbs:.1f} GB/s (median {lim.read_gbs_median:.1f}); "
          f"copy {lim.copy_gbs:.1f} GB/s (read + write)")
    mm = ", ".join(f"n={n}: {g:.0f} (median {lim.matmul_gflops_median[n]:.0f})"
                   for n, g in lim.matmul_gflops.items())
    print(f"fp32 matmul rate, GFLOP/s: {mm}; bound uses {lim.matmul_peak:.0f}")
    print(f"fp32 matrix-vector rate: {lim.matvec_gflops:.1f} GFLOP/s ({lim.matvec_gbs:.1f} GB/s of weights)")


# ---------------------------------------------------------------------------------------- FLOPs
def forward_flops(cfg, n_tokens: int, past: int = 0, batch: int = 1, causal: bool = True,
                  attention: bool = True) -> float:
    """Matrix-product FLOPs of one Command-R forward over ``n_tokens`` new tokens per sequence.

    Counts 2·m·k·n for every projection (q, k, v, o, gate, up, down per layer, plus the unembedding)
    and for the attention products q·kᵀ and pattern·v. With ``causal`` the attention counts only
    the visible (q, k) pairs — what an ideal causal kernel does; element-wise work (norms, rotary,
    softmax, SiLU) is left out, so ``flops / matmul_rate`` is a lower bound on the forward's time.
    ``attention=False`` counts the projections only.

    Example::

        forward_flops(cfg, 256) / (lim.matmul_peak * 1e9)   # seconds, at best
    """
    D, H, K, d, F, V = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.d_head, cfg.d_mlp, cfg.vocab_size
    per_token_params = cfg.n_layers * (D * H * d + 2 * D * K * d + H * d * D + 3 * D * F) + D * V
    linear = 2 * per_token_params * n_tokens
    attn = 0
    for layer in range(cfg.n_layers if attention else 0):
        window = cfg.layer_window(layer)
        pairs = 0
        for q in range(past, past + n_tokens):
            lo = 0 if window is None else max(0, q - window + 1)
            pairs += (q + 1 - lo) if causal else (past + n_tokens - lo)
        attn += 2 * 2 * H * d * pairs               # q·kᵀ and pattern·v
    return float(batch * (linear + attn))


# ---------------------------------------------------------------------------------------- table
def print_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> None:
    """Print rows as an aligned plain-text table (first column left-aligned, the rest right).

    Example::

        print_table([["ours", "612.0 / 640.0", "1.01x"]], ["contender", "min / median ms", "ratio"])
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    for i, row in enumerate(cells):
        if len(row) != len(headers):
            raise ValueError(f"print_table: row {i - 1} has {len(row)} cells, headers have {len(headers)}")
    widths = [max(len(row[j]) for row in cells) for j in range(len(headers))]

    def fmt(row):
        return "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths)))

    print(fmt(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(fmt(row))


if __name__ == "__main__":
    print_limits(measure_limits(threads=2))
