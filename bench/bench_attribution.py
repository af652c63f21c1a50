"""Attribution patching vs exact patching; batched vs unbatched exact sweeps; AtP's peak memory.

Two models:

* "bundled": ``command-r-tiny`` (4 layers, 4 heads) on its induction task — BOS, 20 random tokens,
  the same 20 again without the last (40 positions); corrupted: the token induction copies replaced;
  metric: logit difference of the right next token vs the corrupting one;
* "mid": the random "mid" Command-R every bench uses (bench/_checkpoint.py: d_model 1024, 8 layers,
  16 heads, 4 kv heads, d_mlp 2816, vocab 32000), a ``--mid-pos``-token random prompt with its middle
  token changed. Its exact ``[layer pos head]`` sweep would take hours here, so its exact time is the
  measured time per cell over ``--mid-cells`` cells (every head of the last layer at positions spread
  over the prompt; unbatched and batched) times the number of cells — said so in the output.

Contenders (interleaved round-robin, min / median wall time):

* AtP ``[layer pos head]`` (``kind="z", positions="all"``): clean forward, corrupted forward, one backward;
* IG, 8 steps (bundled only);
* exact ``patch_sweep(kind="z", positions="all")`` with ``batch_size=1`` and ``batch_size=16``;
* exact ``[layer head]`` (z) and ``[layer pos]`` (resid_pre) sweeps, ``batch_size`` 1 vs 16 (bundled).

Peak memory: each of (no-grad forward caching the hooked activations, AtP) runs in a fresh
subprocess; the growth of the process's peak RSS over the loaded model's is reported.

Run::

    python bench/bench_attribution.py                    # both models
    python bench/bench_attribution.py --skip-mid --repeat 3
    python bench/bench_attribution.py --skip-bundled --skip-mid      # AtP's memory only
    python bench/bench_attribution.py --tiny             # smoke test: seconds, numbers meaningless
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402

import hooks  # noqa: E402
from _checkpoint import build_checkpoint  # noqa: E402
from _limits import machine_line, paired_ratio, print_table, timeit_interleaved  # noqa: E402
from hooks.patch_batched import patch_cells, plan_sweep  # noqa: E402
from workbench import HookedCommandR  # noqa: E402
from workbench.analysis import attribution_patching, repeated_random_tokens  # noqa: E402

MID = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=4)
TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=20, help="induction repeat length (bundled)")
    p.add_argument("--mid-pos", type=int, default=128)
    p.add_argument("--mid-cells", type=int, default=32, help="exact cells timed on mid (extrapolated)")
    p.add_argument("--skip-mid", action="store_true", help="no mid timings")
    p.add_argument("--skip-bundled", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--tiny", action="store_true", help="tiny random model instead of mid, short prompt")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def induction_task(model, seq_len: int):
    toks = repeated_random_tokens(model, seq_len=seq_len, n_seqs=1, seed=0, bos_token_id=5, low=8, high=1740)
    clean, answer = toks[:, :-1], toks[:, -1]
    other = repeated_random_tokens(model, seq_len=seq_len, n_seqs=1, seed=100, bos_token_id=5, low=8, high=1740)
    corrupt = clean.clone()
    corrupt[:, seq_len] = torch.where(other[:, 1] == answer, other[:, 2], other[:, 1])
    wrong = corrupt[:, seq_len]
    return clean, corrupt, lambda logits: hooks.logit_diff(logits, answer, wrong)


def random_task(vocab: int, pos: int):
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(8, vocab, (1, pos), generator=g)
    corrupt = clean.clone()
    corrupt[0, pos // 2] = (corrupt[0, pos // 2] + 1) % vocab
    return clean, corrupt, lambda logits: hooks.logit_diff(logits, 11, 12)


def plain_batches(model, corrupt, cache, metric, kind, **axes):
    """The batched sweep without its prefix shortcut: 16 copies of the whole prompt per forward."""
    names = [hooks.hook_name(kind, i) for i in range(model.cfg.n_layers)]
    plan = plan_sweep(model, cache, names, corrupt.shape[1], **axes)
    return patch_cells(model, corrupt, cache, metric, plan.cells(), plan.unit_axis, batch_size=16,
                       reuse_prefix=False).reshape(plan.shape)


def z_cache(model, clean, kind="z"):
    names = [hooks.hook_name(kind, i) for i in range(model.cfg.n_layers)]
    return model.run_with_cache(clean, names_filter=names)[1]


def bench_bundled(args, rows, notes):
    model = HookedCommandR.from_pretrained("command-r-tiny", progress=False)
    clean, corrupt, metric = induction_task(model, args.seq_len)
    cache, resid = z_cache(model, clean), z_cache(model, clean, "resid_pre")
    L, H, P = model.cfg.n_layers, model.cfg.n_heads, clean.shape[1]
    contenders = {
        "AtP [layer pos head]": lambda: attribution_patching(model, clean, corrupt, metric, kind="z", positions="all"),
        "IG 8 steps [layer pos head]": lambda: attribution_patching(model, clean, corrupt, metric, kind="z",
                                                                    positions="all", method="ig", steps=8),
        "exact [layer pos head], batch 1": lambda: hooks.patch_sweep(model, corrupt, cache, metric, kind="z",
                                                                     positions="all"),
        "exact [layer pos head], batch 16": lambda: hooks.patch_sweep(model, corrupt, cache, metric, kind="z",
                                                                      positions="all", batch_size=16),
        "exact [layer pos head], batch 16, whole prompt": lambda: plain_batches(model, corrupt, cache, metric, "z",
                                                                                positions="all"),
        "exact [layer head], batch 1": lambda: hooks.patch_sweep(model, corrupt, cache, metric, kind="z"),
        "exact [layer head], batch 16": lambda: hooks.patch_sweep(model, corrupt, cache, metric, kind="z",
                                                                  batch_size=16),
        "exact [layer head], batch 16, whole prompt": lambda: plain_batches(model, corrupt, cache, metric, "z"),
        "exact resid_pre [layer pos], batch 1": lambda: hooks.patch_sweep(model, corrupt, resid, metric,
                                                                          kind="resid_pre"),
        "exact resid_pre [layer pos], batch 16": lambda: hooks.patch_sweep(model, corrupt, resid, metric,
                                                                           kind="resid_pre", batch_size=16),
    }
    t = timeit_interleaved(contenders, repeat=args.repeat, warmup=1)
    cells = {"[layer pos head]": L * P * H, "[layer head]": L * H, "resid_pre [layer pos]": L * P}
    for name, timing in t.items():
        n = next((v for k, v in cells.items() if k in name), L * P * H)
        rows.append(["bundled", name, n, timing.ms(), f"{timing.cpu_min * 1e3:.0f}"])
    atp = t["AtP [layer pos head]"]
    for what in ("exact [layer pos head], batch 1", "exact [layer pos head], batch 16", "IG 8 steps [layer pos head]"):
        notes.append(f"bundled: {what} / AtP = {t[what].min / atp.min:.1f}x (min), "
                     f"{paired_ratio(t[what], atp):.1f}x (paired)")
    for grid in ("[layer pos head]", "[layer head]", "resid_pre [layer pos]"):
        one = t[f"exact {grid}, batch 1"]
        for variant in ("batch 16", "batch 16, whole prompt"):
            if f"exact {grid}, {variant}" not in t:
                continue
            many = t[f"exact {grid}, {variant}"]
            notes.append(f"bundled: exact {grid} batch 1 / {variant} = {one.min / many.min:.2f}x (min), "
                         f"{paired_ratio(one, many):.2f}x (paired), cpu {one.cpu_min / many.cpu_min:.2f}x")


def bench_mid(args, rows, notes, path):
    model = HookedCommandR.from_pretrained(path, progress=False)
    clean, corrupt, metric = random_task(model.cfg.vocab_size, args.mid_pos)
    cache = z_cache(model, clean)
    L, H, P = model.cfg.n_layers, model.cfg.n_heads, clean.shape[1]
    n_cells = L * P * H
    # a sample of cells: every head of the last layer at positions spread over the prompt (an unbatched
    # cell costs one forward wherever it is; a batched one costs less the later its position)
    positions = sorted({int(p) for p in torch.linspace(0, P - 1, max(1, args.mid_cells // H))})
    layers = [L - 1]
    sample = len(layers) * len(positions) * H

    def exact(batch_size):
        return lambda: hooks.patch_sweep(model, corrupt, cache, metric, kind="z", layers=layers, positions=positions,
                                         batch_size=batch_size)

    t = timeit_interleaved({"AtP [layer pos head]": lambda: attribution_patching(
        model, clean, corrupt, metric, kind="z", positions="all"),
        "exact sample, batch 1": exact(1), "exact sample, batch 16": exact(16)}, repeat=args.repeat, warmup=1)
    atp = t["AtP [layer pos head]"]
    rows.append(["mid", "AtP [layer pos head]", n_cells, atp.ms(), f"{atp.cpu_min * 1e3:.0f}"])
    for b in (1, 16):
        s = t[f"exact sample, batch {b}"]
        rows.append(["mid", f"exact sample ({sample} cells), batch {b}", sample, s.ms(), f"{s.cpu_min * 1e3:.0f}"])
        full = s.min / sample * n_cells
        notes.append(f"mid: exact [layer pos head] batch {b} ≈ {full:.0f} s ({n_cells} cells, extrapolated "
                     f"from {sample} at positions {positions}) / AtP = {full / atp.min:.0f}x")
    one, many = t["exact sample, batch 1"], t["exact sample, batch 16"]
    notes.append(f"mid: exact sample batch 1 / batch 16 = {one.min / many.min:.2f}x (min), "
                 f"{paired_ratio(one, many):.2f}x (paired)")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(spec: str) -> None:
    """Print, for one operation in this fresh process: the peak growth of resident memory (sampled every
    millisecond) and the bytes autograd saved for the backward (distinct storages, weights excluded)."""
    import threading

    cfg = json.loads(spec)
    torch.set_num_threads(cfg["threads"])
    model = HookedCommandR.from_pretrained(cfg["path"], progress=False)
    clean, corrupt, metric = random_task(model.cfg.vocab_size, cfg["pos"])
    names = [hooks.hook_name("z", i) for i in range(model.cfg.n_layers)]
    with torch.no_grad():
        model.run_with_cache(corrupt, names_filter=names)              # warm the allocator and the kernels
    saved = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):                                      # activations only: the weights are resident anyway
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    peak, stop = [0], threading.Event()
    base = _rss_bytes()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if cfg["op"] == "forward":
                with torch.no_grad():
                    model.run_with_cache(corrupt, names_filter=names)
            else:
                attribution_patching(model, clean, corrupt, metric, kind="z", positions="all")
    finally:
        stop.set()
        sampler.join()
    print(json.dumps({"mib": (peak[0] - base) / 2**20, "saved_mib": sum(saved.values()) / 2**20}))


def bench_memory(args, rows, notes, path, pos):
    got = {}
    for op in ("forward", "atp"):
        spec = json.dumps(dict(path=path, pos=pos, op=op, threads=args.threads))
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-worker", spec],
                             capture_output=True, text=True, timeout=1800)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-2000:])
        got[op] = json.loads(out.stdout.strip().splitlines()[-1])
    notes.append(f"peak resident-memory growth, {pos}-token prompt: no-grad forward caching hook_z "
                 f"{got['forward']['mib']:.0f} MiB; AtP [layer pos head] (2 forwards + 1 backward) "
                 f"{got['atp']['mib']:.0f} MiB, autograd saved {got['atp']['saved_mib']:.0f} MiB of activations for the backward")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_worker:
        memory_worker(args.memory_worker)
        return 0
    torch.set_num_threads(args.threads)
    print(machine_line())
    rows, notes = [], []
    if args.tiny:
        args.seq_len, args.mid_pos, args.mid_cells, args.repeat = 6, 12, 8, 1
    if not args.skip_bundled:
        bench_bundled(args, rows, notes)
    tmp = tempfile.TemporaryDirectory(prefix="bench-attribution-")
    if not (args.skip_mid and args.skip_memory):
        path = build_checkpoint(os.path.join(tmp.name, "ckpt"), **(TINY if args.tiny else MID))
        if not args.skip_mid:
            bench_mid(args, rows, notes, path)
        if not args.skip_memory:
            bench_memory(args, rows, notes, path, args.mid_pos)
    print_table(rows, ["model", "contender", "cells", "min / median ms", "cpu ms"])
    print()
    for line in notes:
        print(line)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
