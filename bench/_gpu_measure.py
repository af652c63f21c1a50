"""gpu_check's measuring helpers: device syncs around timed work, the device's copy bandwidth, peak
memory of one call, and bit-level tensor comparison.

On CUDA every timed call ends with ``torch.cuda.synchronize()`` (kernels are asynchronous: without
it a timer measures only the launch); the repetitions are interleaved round-robin by
``_limits.timeit_interleaved`` after warm-ups. On the CPU the sync is a no-op and peak memory is
reported as unavailable (the process RSS high-water mark cannot be reset between calls).

Example::

    sync = make_sync(device)
    res = timed({"ours": lambda: ours(ids), "hf": lambda: hf(ids)}, sync, repeat=5, warmup=2)
    res["ours"].min / res["hf"].min
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from _limits import Timing, machine_line, timeit, timeit_interleaved


def make_sync(device: torch.device) -> Callable[[], None]:
    """A function that waits for every kernel queued on ``device`` (no-op on the CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def timed(contenders: Dict[str, Callable[[], object]], sync: Callable[[], None], repeat: int,
          warmup: int) -> Dict[str, Timing]:
    """Wall times of each contender (synced at the end of every call), interleaved round-robin."""
    def synced(fn):
        def run():
            fn()
            sync()
        return run

    sync()
    return timeit_interleaved({k: synced(f) for k, f in contenders.items()}, repeat=repeat, warmup=warmup)


def copy_bandwidth(device: torch.device, mib: int, repeat: int = 7) -> float:
    """Best copy bandwidth on ``device`` in GB/s, counting bytes read + bytes written."""
    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    sync = make_sync(device)

    def run():
        dst.copy_(src)
        sync()

    sync()
    t = timeit(run, repeat=repeat, warmup=2)
    return 2 * src.numel() * 4 / t.min / 1e9


def peak_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak memory allocated during ``fn()`` above what was allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return int(peak)


def device_line(device: torch.device) -> str:
    """The device in words, for the table header."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return (f"{p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, "
                f"torch {torch.__version__}")
    return f"CPU: {machine_line()}"


_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bits (NaN payloads included): stricter than ``torch.equal``, and true
    for two identical NaNs, which ``torch.equal`` calls different."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    as_int = _INT[a.element_size()]
    return torch.equal(a.contiguous().view(as_int), b.contiguous().view(as_int))


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| in fp32 (nan if either holds a non-finite value)."""
    a, b = a.float(), b.float()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("nan")
    return float((a - b).abs().max()) if a.numel() else 0.0
