"""One prepared check for a machine with a GPU: bits, speed and memory against transformers.

For each shape (command-r-v01: MHA; command-r-plus: GQA + QK-norm; Command A: cohere2, GQA, sliding
window + a NoPE global layer), at real widths with few layers, random weights are built ONCE on the
device in each dtype and shared by our ``HookedCommandR`` and transformers' ``Cohere(2)ForCausalLM``
(``bench/_gpu_models.py``: transformers' model gets our tensors; ``data_ptr`` equality is checked
and shown in the *shared* column). Then ONE table, a row per (model, dtype):

* **explicit == eager**: our explicit path vs transformers' eager attention, bit for bit
  (``_gpu_measure.bitwise_equal``), batch 1 and a left-padded batch of 3 (real positions);
* **fused − sdpa max|Δ|**: our fused path vs transformers' sdpa, batch 1 / padded (0 = equal);
* **greedy**: ``generate`` (explicit) vs transformers' ``generate`` (eager) on the padded batch,
  token equality, and how many decode steps' logits are bitwise equal (prefill step included);
* timing dtype rows only (bf16 by default): **prefill ×sdpa** = our fused forward ÷ transformers'
  sdpa forward at 512 and 2048 tokens (min over interleaved, synced repetitions after warm-ups);
  **rwc ×fwd** = ``run_with_cache`` of every hook ÷ our forward at 512; **decode tok/s** of our
  ``generate`` (decode steps only: (N-1) / (t(N) - t(1))), its ratio to transformers' ``generate``
  with the dynamic cache and with ``cache_implementation="static"`` (auto-compiled by transformers
  on CUDA unless ``--no-compile``), and to the bandwidth floor (measured device copy bandwidth ÷
  weight bytes: every weight read once per step); **peak MiB** above the weights of our forward and
  of our forward with one hooked pattern (layer 0, kept) at 2048 tokens (CUDA only).

Run::

    python bench/gpu_check.py                        # on a GPU machine; a few minutes
    python bench/gpu_check.py --out gpu_check.json   # + every number as JSON
    python bench/gpu_check.py --models command-r-v01 --dtypes bf16 --layers 40   # one big model
    python bench/gpu_check.py --tiny                 # the same code on a CPU at tiny widths, seconds

transformers is imported here (bench/) only; ``workbench`` never imports it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from _gpu_measure import bitwise_equal, copy_bandwidth, device_line, make_sync, max_abs_diff, peak_bytes, timed  # noqa: E402
from _gpu_models import PRESETS, build_pair, real_spec, share_check, tiny_spec, weight_bytes  # noqa: E402
from _limits import print_table  # noqa: E402
from hooks.patch import hook_name  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
REAL = dict(lengths="512,2048", prompt=48, new=64, repeat=5, warmup=2, copy_mib=1024)
TINY = dict(lengths="16,64", prompt=12, new=4, repeat=1, warmup=0, copy_mib=16)
COLUMNS = ["model", "dtype", "shared", "explicit==eager b1 / pad", "fused-sdpa max|d| b1 / pad",
           "greedy tokens", "steps bitwise", "prefill x sdpa", "rwc x fwd", "decode tok/s",
           "x hf dynamic / static", "x floor", "peak MiB fwd / +pattern"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny widths on the CPU (seconds): the smoke test")
    p.add_argument("--device", default=None, help="default: cuda if available (cpu with --tiny)")
    p.add_argument("--models", default=",".join(PRESETS), help=f"comma list of {list(PRESETS)}")
    p.add_argument("--layers", type=int, default=None, help="layers per model (default 2; Command A 4)")
    p.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma list of bf16, fp16, fp32")
    p.add_argument("--timing-dtype", default="bf16", help="the dtype whose rows carry timing and memory")
    p.add_argument("--lengths", default=None, help="prefill lengths (default 512,2048; --tiny 16,64)")
    p.add_argument("--prompt", type=int, default=None, help="parity prompt length (padded rows shorter)")
    p.add_argument("--decode-steps", type=int, default=11, help="greedy tokens in the parity check")
    p.add_argument("--new", type=int, default=None, help="tokens generated per timed generate (default 64)")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--copy-mib", type=int, default=None, help="MiB copied to measure the bandwidth")
    p.add_argument("--no-timing", action="store_true", help="bits only")
    p.add_argument("--no-compile", action="store_true", help="static-cache generate without auto-compile")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (--tiny: 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write every number as JSON to this file")
    args = p.parse_args(argv)
    for k, v in (TINY if args.tiny else REAL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.lengths = [int(x) for x in str(args.lengths).split(",")]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for m in args.models:
        if m not in PRESETS:
            p.error(f"--models: unknown {m!r}; expected some of {list(PRESETS)}")
    for d in args.dtypes + [args.timing_dtype]:
        if d not in DTYPES:
            p.error(f"--dtypes/--timing-dtype: unknown {d!r}; expected some of {list(DTYPES)}")
    if args.threads is None and args.tiny:
        args.threads = 1                               # tiny matrices gain nothing from a thread pool
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    return args


def padded_prompts(lengths, vocab: int, device, seed: int):
    """Left-padded ids [batch pos] (pad id 0, real ids from 7) and the mask (1 = real)."""
    gen = torch.Generator().manual_seed(seed)
    n = max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, length in enumerate(lengths):
        ids[i, n - length:] = torch.randint(7, vocab, (length,), generator=gen)
        mask[i, n - length:] = 1
    return ids.to(device), mask.to(device)


def _hf_generate(hf, ids, mask=None, **kw):
    return hf.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None,
                       pad_token_id=hf.config.pad_token_id, **kw)


def _cell(fn, row: dict, key: str):
    """Run one measurement; a failure is recorded in the row (and its traceback printed), not fatal."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a prepared script reports every cell it can
        traceback.print_exc(file=sys.stderr)
        row.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"[:300]
        return None


def parity(ours, hf, args, device, row: dict) -> None:
    """Explicit vs eager bits, fused vs sdpa max|Δ|, greedy decode tokens and per-step logits."""
    vocab = ours.cfg.vocab_size
    p = args.prompt
    one, _ = padded_prompts([p], vocab, device, args.seed + 1)
    ids, mask = padded_prompts([p, max(2, 2 * p // 3), max(2, p // 3)], vocab, device, args.seed + 2)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()

    def forwards(ours_impl, hf_impl):
        ours.attn_impl = ours_impl
        hf.set_attn_implementation(hf_impl)
        a1, b1 = ours(one), hf(one).logits
        ap = ours(ids, attention_mask=mask, position_ids=pos)[real]
        bp = hf(ids, attention_mask=mask, position_ids=pos).logits[real]
        return (a1, b1), (ap, bp)

    def explicit():
        (a1, b1), (ap, bp) = forwards("explicit", "eager")
        row["explicit_eager_b1"], row["explicit_eager_pad"] = bitwise_equal(a1, b1), bitwise_equal(ap, bp)
        row["explicit_eager_maxdiff"] = max(max_abs_diff(a1, b1), max_abs_diff(ap, bp))
        row["logits_finite"] = bool(torch.isfinite(b1).all() and torch.isfinite(bp).all())

    def fused():
        (a1, b1), (ap, bp) = forwards("fused", "sdpa")
        row["fused_sdpa_b1"], row["fused_sdpa_pad"] = max_abs_diff(a1, b1), max_abs_diff(ap, bp)
        row["fused_sdpa_bitwise"] = bitwise_equal(a1, b1) and bitwise_equal(ap, bp)

    def greedy():
        ours.attn_impl = "explicit"
        hf.set_attn_implementation("eager")
        n = args.decode_steps
        theirs = _hf_generate(hf, ids, mask, max_new_tokens=n, return_dict_in_generate=True, output_logits=True)
        steps = []
        handle = ours.register_forward_hook(lambda m, a, out: steps.append(out[:, -1].float().clone()))
        try:
            mine = ours.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[])
        finally:
            handle.remove()
        row["greedy_tokens_equal"] = bool(torch.equal(mine, theirs.sequences))
        row["greedy_steps"] = n
        row["greedy_steps_bitwise"] = sum(bitwise_equal(a, b.float()) for a, b in zip(steps, theirs.logits))
        row["greedy_distinct_tokens"] = min(len(set(r.tolist())) for r in mine[:, ids.shape[1]:])  # per row

    for name, fn in (("explicit", explicit), ("fused", fused), ("greedy", greedy)):
        _cell(fn, row, name)


def timing(ours, hf, args, device, copy_gbs: float, row: dict) -> None:
    """Prefill ratios, run_with_cache, decode tokens/s against transformers and the floor, peak memory."""
    sync = make_sync(device)
    vocab = ours.cfg.vocab_size
    ours.attn_impl = "auto"
    hf.set_attn_implementation("sdpa")

    def prefill():
        out = {}
        for i, n in enumerate(args.lengths):
            ids, _ = padded_prompts([n], vocab, device, args.seed + 10 + n)
            fns = {"hf": lambda: hf(ids), "ours": lambda: ours(ids)}
            if i == 0:
                fns["rwc"] = lambda: ours.run_with_cache(ids)
            res = timed(fns, sync, args.repeat, args.warmup)
            out[n] = {k: t.min for k, t in res.items()}
        row["prefill_s"] = out
        row["prefill_ratio"] = {n: v["ours"] / v["hf"] for n, v in out.items()}
        first = out[args.lengths[0]]
        row["rwc_ratio"] = first["rwc"] / first["ours"]

    def decode():
        ids, _ = padded_prompts([32 if not args.tiny else 8], vocab, device, args.seed + 3)
        n = args.new
        static = dict(cache_implementation="static", disable_compile=True if args.no_compile else None)
        fns = {}
        for k in (n, 1):
            fns[f"ours {k}"] = lambda k=k: ours.generate(ids, max_new_tokens=k, eos_token_id=[])
            fns[f"hf dynamic {k}"] = lambda k=k: _hf_generate(hf, ids, max_new_tokens=k)
            fns[f"hf static {k}"] = lambda k=k: _hf_generate(hf, ids, max_new_tokens=k, **static)
        for name in list(fns):                         # first call: warm-up (and compile); drop failures
            if _cell(lambda: (fns[name](), sync(), True)[-1], row, f"decode {name}") is None:
                del fns[name]
        res = timed(fns, sync, args.repeat, max(0, args.warmup - 1))
        rate = {}
        for who in ("ours", "hf dynamic", "hf static"):
            if f"{who} {n}" in res and f"{who} 1" in res:
                dt = res[f"{who} {n}"].min - res[f"{who} 1"].min
                rate[who] = (n - 1) / dt if dt > 0 else float("nan")     # nan: noise beat the steps
        wbytes = weight_bytes(ours)
        row["decode_tok_s"] = rate
        row["weight_bytes"] = wbytes
        row["floor_tok_s"] = copy_gbs * 1e9 / wbytes
        row["decode_new_tokens"] = n

    def memory():
        ids, _ = padded_prompts([args.lengths[-1]], vocab, device, args.seed + 4)
        kept = []
        pattern = [(hook_name("pattern", 0), lambda x, hook: kept.append(x))]
        row["peak_fwd_bytes"] = peak_bytes(lambda: ours(ids), device)
        row["peak_pattern_bytes"] = peak_bytes(lambda: ours.run_with_hooks(ids, fwd_hooks=pattern), device)
        row["peak_hf_sdpa_bytes"] = peak_bytes(lambda: hf(ids).logits, device)
        kept.clear()

    for name, fn in (("prefill", prefill), ("decode", decode), ("memory", memory)):
        _cell(fn, row, name)


# ---------------------------------------------------------------------------------------- table
def _eq(v) -> str:
    return "-" if v is None else ("equal" if v else "DIFFER")


def _f(v, fmt) -> str:
    return "-" if v is None else format(v, fmt)


def table_row(row: dict) -> list:
    r = row
    rate = r.get("decode_tok_s") or {}
    ours = rate.get("ours")
    greedy = "-" if "greedy_tokens_equal" not in r else ("equal" if r["greedy_tokens_equal"] else "DIFFER")
    steps = "-" if "greedy_steps_bitwise" not in r else f"{r['greedy_steps_bitwise']}/{r['greedy_steps']}"
    prefill = "-" if "prefill_ratio" not in r else " / ".join(f"{v:.2f}@{n}" for n, v in r["prefill_ratio"].items())
    vs = "-" if ours is None else " / ".join(_f(ours / rate[k], ".2f") if k in rate else "n/a"
                                            for k in ("hf dynamic", "hf static"))
    floor = "-" if ours is None else f"{ours / r['floor_tok_s']:.2f}"
    if "peak_fwd_bytes" in r:
        mem = "n/a (cpu)" if r["peak_fwd_bytes"] is None else \
            f"{r['peak_fwd_bytes'] / 2**20:.0f} / {r['peak_pattern_bytes'] / 2**20:.0f}"
    else:
        mem = "-"
    shared = "yes" if r.get("shared") else "NO"
    return [r["label"], r["dtype"], shared,
            f"{_eq(r.get('explicit_eager_b1'))} / {_eq(r.get('explicit_eager_pad'))}",
            f"{_f(r.get('fused_sdpa_b1'), '.1e')} / {_f(r.get('fused_sdpa_pad'), '.1e')}",
            greedy, steps, prefill, _f(r.get("rwc_ratio"), ".2f"), _f(ours, ".1f"), vs, floor, mem]


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@torch.no_grad()
def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    print(f"== gpu_check{' --tiny' if args.tiny else ''}: ours vs transformers {transformers.__version__} ==")
    print(f"device: {device_line(device)}")
    copy_gbs = copy_bandwidth(device, args.copy_mib)
    print(f"device copy bandwidth: {copy_gbs:.1f} GB/s (bytes read + written, {args.copy_mib} MiB, best of 7)")
    rows = []
    for model in args.models:
        spec = (tiny_spec if args.tiny else real_spec)(model, args.layers)
        for dname in args.dtypes:
            row = {"label": spec.label, "preset": model, "dtype": dname, "layers": spec.cfg.n_layers}
            rows.append(row)
            t1 = time.perf_counter()
            pair = _cell(lambda: build_pair(spec, DTYPES[dname], device, args.seed), row, "build")
            if pair is None:
                continue
            ours, hf = pair
            hf.generation_config.eos_token_id = None              # no EOS stop: always the asked length
            row.update(share_check(ours, hf))
            parity(ours, hf, args, device, row)
            if dname == args.timing_dtype and not args.no_timing:
                timing(ours, hf, args, device, copy_gbs, row)
            row["seconds"] = time.perf_counter() - t1
            print(f"  {spec.label} {dname}: {row['seconds']:.1f} s", file=sys.stderr, flush=True)
            del ours, hf, pair
            _free(device)
    print(f"{len(rows)} rows; prompts: batch 1 x {args.prompt} and left-padded batch 3; greedy "
          f"{args.decode_steps} tokens on the padded batch; timing in {args.timing_dtype}, "
          f"{args.repeat} interleaved repetitions after {args.warmup} warm-ups, min")
    print_table([table_row(r) for r in rows], COLUMNS)
    bits = [r.get(k) for r in rows for k in ("explicit_eager_b1", "explicit_eager_pad")]
    bits += [r.get("greedy_tokens_equal") for r in rows]
    bits += [r.get("greedy_steps_bitwise") == r.get("greedy_steps") for r in rows]
    errors = {f"{r['label']} {r['dtype']}": r["errors"] for r in rows if r.get("errors")}
    print(f"bitwise checks: {sum(b is True for b in bits)}/{len(bits)} equal; "
          f"weights shared in {sum(bool(r.get('shared')) for r in rows)}/{len(rows)} rows; "
          f"errors: {errors or 'none'}")
    elapsed = time.perf_counter() - t0
    print(f"total {elapsed:.1f} s")
    if args.out:
        meta = {"device": device_line(device), "copy_gbs": copy_gbs, "transformers": transformers.__version__,
                "torch": torch.__version__, "seconds": elapsed, "args": vars(args)}
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"meta": meta, "columns": COLUMNS, "table": [table_row(r) for r in rows], "rows": rows},
                      f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
