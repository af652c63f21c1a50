"""Greedy generation: ours vs transformers' ``generate``, beside the machine's memory-bound limits.

One random "mid" Command-R checkpoint (d_model 1024, 8 layers, 16 heads, 4 kv heads, d_mlp 2816,
vocab 32000, qk-norm, fp32) is built with transformers in a temporary folder; batch 1, a 32-token
prompt, 64 new tokens, greedy, ``torch.set_num_threads(2)``, EOS stopping off on both sides (every
run makes all 64 tokens). Repetitions of every contender are interleaved round-robin; min and
median are reported (the machine is shared: min is the least-disturbed run).

Contenders:

* transformers ``generate`` (sdpa, its default; the ratio denominator);
* ours ``model.generate`` (fused SDPA when nothing hooks the pattern);
* ours with per-step capture of every layer's ``resid_post`` (``capture=`` + ``on_step=``);
* one generated token (prefill + first token) of each, so that the decode step alone is
  ``(t(64) - t(1)) / 63``.

Limits measured in the same run:

* the bare matrix-vector products of one decode step: every projection of every layer plus the
  unembedding as ``F.linear`` on a ``[1, 1, d_model]`` input (nothing else) — the floor for a
  step that reads every weight once;
* weight bytes ÷ measured memory read bandwidth.

Run::

    python bench/bench_generate.py                      # the issue-5 configuration
    python bench/bench_generate.py --repeat 9 --profile
    python bench/bench_generate.py --tiny --repeat 1    # smoke test, seconds
    python bench/bench_generate.py --cpu-time           # 1 thread, thread CPU time: stable on a busy machine

``--cpu-time`` measures ``time.thread_time()`` with one torch thread instead of wall time with two:
on a machine shared with other jobs, wall time with two threads mostly measures the other jobs (an
OpenMP region waits for its slowest, descheduled thread), while one thread's CPU time still counts
memory stalls, so the ratios to the bare matrix-vector products stay meaningful.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _checkpoint import build_from_args  # noqa: E402
from _limits import Timing, measure_limits, print_limits, print_table, timeit, timeit_interleaved  # noqa: E402

MID = dict(d_model=1024, layers=8, heads=16, kv_heads=4, d_mlp=2816, vocab=32000, prompt=32, new=64)
TINY = dict(d_model=64, layers=2, heads=4, kv_heads=2, d_mlp=128, vocab=97, prompt=8, new=8)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config + quick limits (smoke test)")
    for k, v in MID.items():
        p.add_argument(f"--{k.replace('_', '-')}", type=int, default=None, help=f"default {v}")
    p.add_argument("--no-qk-norm", action="store_true")
    p.add_argument("--repeat", type=int, default=7, help="timed repetitions per contender")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="where one decode step of ours spends its time")
    p.add_argument("--cpu-time", action="store_true", help="1 thread, measure thread CPU time (busy machines)")
    args = p.parse_args(argv)
    if args.cpu_time:
        args.threads = 1
    for k, v in (TINY if args.tiny else MID).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def build_checkpoint(path: str, args) -> str:
    return build_from_args(path, args)


def bare_matvecs(model):
    """A function doing exactly the matrix-vector products of one decode step, nothing else."""
    weights = []
    for block in model.blocks:
        a, m = block.attn, block.mlp
        weights += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
                    m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight]
    weights.append(model.unembed.weight)
    xs = {n: torch.randn(1, 1, n) for n in {w.shape[1] for w in weights}}

    def run():
        for w in weights:
            F.linear(xs[w.shape[1]], w)

    n_bytes = sum(p.numel() * p.element_size() for p in {id(w): w for w in weights}.values())
    return run, n_bytes


def profile_decode(model, ids, steps: int = 16) -> None:
    """torch.profiler over ``steps`` decode steps of ours (self CPU time by operator)."""
    from torch.profiler import ProfilerActivity, profile

    from workbench.generation import decode_step, prefill
    from workbench.kv_cache import KVCache

    def run():
        cache = KVCache.for_model(model)
        with torch.no_grad():
            logits = prefill(model, ids, cache)
            tok = logits.argmax(-1)
            for i in range(steps):
                logits = decode_step(model, tok, cache, None, torch.tensor([[ids.shape[1] + i]]))
                tok = logits.argmax(-1)

    run()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    print(f"\n--- profile: ours, prefill + {steps} decode steps (self CPU time) ---")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=44))


def cpu_time_interleaved(contenders: dict, repeat: int, warmup: int) -> dict:
    """Like ``_limits.timeit_interleaved`` but with ``time.thread_time`` (this thread's CPU time)."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    out = {name: Timing() for name in contenders}
    for _ in range(repeat):
        for name, fn in contenders.items():
            gc.collect()
            t0 = time.thread_time()
            fn()
            out[name].times.append(time.thread_time() - t0)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lim = measure_limits(threads=args.threads, quick=args.tiny)
    print("== bench_generate: greedy generation, batch 1 ==")
    print_limits(lim)
    import transformers

    from workbench import HookedCommandR

    tmp = tempfile.TemporaryDirectory(prefix="bench-generate-")
    try:
        ckpt = build_checkpoint(os.path.join(tmp.name, "ckpt"), args)
        ours = HookedCommandR.from_pretrained(ckpt, dtype=torch.float32).eval()
        hf = transformers.CohereForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        hf.generation_config.eos_token_id = None            # no EOS stopping: always args.new tokens
        cfg = ours.cfg
        ids = torch.randint(3, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1234))
        n_layers = cfg.n_layers
        resid = [f"blocks.{i}.hook_resid_post" for i in range(n_layers)]
        seen = []

        def on_step(info):
            seen.append(sum(float(t[0, -1, 0]) for t in info.activations.values()))

        def hf_gen(n):
            with torch.no_grad():
                return hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)

        def ours_gen(n):
            return ours.generate(ids, max_new_tokens=n, eos_token_id=[])

        def ours_capture(n):
            return ours.generate(ids, max_new_tokens=n, eos_token_id=[], capture=resid, on_step=on_step)

        matvec, weight_bytes = bare_matvecs(ours)
        a, b, c = hf_gen(args.new), ours_gen(args.new), ours_capture(args.new)
        assert a.shape[1] == b.shape[1] == c.shape[1] == args.prompt + args.new, (a.shape, b.shape, c.shape)
        agree = int((a[0, args.prompt:] == b[0, args.prompt:]).sum())
        print(f"config: d_model {cfg.d_model}, {n_layers} layers, {cfg.n_heads} heads, {cfg.n_kv_heads} kv heads, "
              f"d_mlp {cfg.d_mlp}, vocab {cfg.vocab_size}, qk-norm {cfg.use_qk_norm}, fp32; prompt {args.prompt}, "
              f"{args.new} new tokens greedy; {args.repeat} interleaved repetitions (+{args.warmup} warm-up)")
        print(f"ours vs transformers: {agree}/{args.new} generated tokens identical "
              f"(fused vs sdpa attention, not bit-exact paths)")

        fns = {"transformers generate": lambda: hf_gen(args.new),
               "ours generate": lambda: ours_gen(args.new),
               "ours generate + capture resid_post": lambda: ours_capture(args.new),
               "transformers 1 token": lambda: hf_gen(1),
               "ours 1 token": lambda: ours_gen(1),
               "ours 1 token + capture": lambda: ours_capture(1),
               "bare matvecs of one step": matvec}
        clock = "thread CPU time, 1 thread" if args.cpu_time else f"wall time, {args.threads} threads"
        print(f"timing: {clock}")
        with torch.no_grad():
            timer = cpu_time_interleaved if args.cpu_time else timeit_interleaved
            res = timer(fns, repeat=args.repeat, warmup=args.warmup)
        read_floor = weight_bytes / (lim.read_gbs * 1e9)
        mv = res["bare matvecs of one step"]

        def step(name_full, name_one, stat):
            return (getattr(res[name_full], stat) - getattr(res[name_one], stat)) / (args.new - 1)

        rows = []
        base = {st: getattr(res["transformers generate"], st) for st in ("min", "median")}
        for full, one in (("transformers generate", "transformers 1 token"), ("ours generate", "ours 1 token"),
                          ("ours generate + capture resid_post", "ours 1 token + capture")):
            t = res[full]
            s_min, s_med = step(full, one, "min"), step(full, one, "median")
            rows.append([full, t.ms(), f"{args.new / t.min:.1f} / {args.new / t.median:.1f}",
                         f"{base['min'] / t.min:.2f}x / {base['median'] / t.median:.2f}x",
                         f"{s_min * 1e3:.1f} / {s_med * 1e3:.1f}", f"{s_min / mv.min:.2f}x",
                         f"{s_min / read_floor:.2f}x"])
        rows.append(["bare matvecs of one step", mv.ms(), "", "", mv.ms(), "1.00x", f"{mv.min / read_floor:.2f}x"])
        rows.append([f"weight bytes / read bandwidth ({weight_bytes / 1e6:.0f} MB)", f"{read_floor * 1e3:.1f}", "",
                     "", f"{read_floor * 1e3:.1f}", f"{read_floor / mv.min:.2f}x", "1.00x"])
        print_table(rows, ["contender", "min / median ms", "tokens/s", "speed vs transformers",
                           "decode step ms", "step / matvecs", "step / read floor"])
        cap, plain = res["ours generate + capture resid_post"], res["ours generate"]
        print(f"per-step capture of {n_layers} resid_post: {cap.min / plain.min:.2f}x plain decoding (min), "
              f"{cap.median / plain.median:.2f}x (median); target <= 1.5x")
        print(f"ours vs transformers tokens/s: {res['transformers generate'].min / plain.min:.2f}x (min), "
              f"{res['transformers generate'].median / plain.median:.2f}x (median); target >= 1.15x")
        if args.profile:
            profile_decode(ours, ids)
            print(timeit(matvec, repeat=3).ms(), "ms bare matvecs (again, after profiling)")
    finally:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
