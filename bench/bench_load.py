"""Checkpoint loading: time and rise in peak RSS, ours vs transformers' ``from_pretrained``.

One random "mid" Command-R checkpoint (d_model 1024, 8 layers, 16 heads, 4 kv heads, d_mlp 2816,
vocab 32000, qk-norm; stored in fp32) is saved by transformers in a temporary folder. Each
measurement runs in a fresh subprocess: imports first (so neither side pays for importing during the
load), then ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` before and after the load, and the wall
time of the load alone. Contenders and dtypes are interleaved round-robin over ``--repeat`` rounds;
the table shows the min / median time and the least rise in peak RSS, each as a ratio to
transformers on the same folder and dtype (goal: both <= 1.0; and, when casting, rise <= 1.2 x the
weight bytes). Each worker then runs one short forward (ours: explicit attention; transformers:
eager) and the table's last column is max |Δ logits| between the two loads: the same function.

Run::

    python bench/bench_load.py                  # mid config, 3 rounds
    python bench/bench_load.py --tiny --repeat 1  # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

MID = dict(vocab_size=32000, hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
           num_key_value_heads=4, intermediate_size=2816, use_qk_norm=True)
TINY = dict(vocab_size=512, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=256, use_qk_norm=True)
DTYPES = ("float32", "bfloat16")


def build_checkpoint(path: str, tiny: bool) -> str:
    from _checkpoint import build_checkpoint as build

    return build(path, **(TINY if tiny else MID))


# ------------------------------------------------------------------------------------- worker side
def worker(who: str, path: str, dtype_name: str, out: str) -> None:
    """Runs in a fresh process: import, measure one load, run a short forward, print JSON."""
    import gc
    import resource
    import time

    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    if who == "ours":
        import accelerate  # noqa: F401  (imported lazily by the loader; not part of the load)
        import tqdm.auto  # noqa: F401

        import workbench.loading  # noqa: F401
        import workbench.offload  # noqa: F401
        from workbench import HookedCommandR

        def load():
            return HookedCommandR.from_pretrained(path, torch_dtype=dtype, progress=False)
    else:
        import transformers
        from transformers.models.cohere import modeling_cohere  # noqa: F401

        transformers.utils.logging.disable_progress_bar()

        def load():
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    gc.collect()
    hwm_reset = _reset_hwm()
    rss0 = _status("VmRSS")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    hwm_rise = _status("VmHWM") - rss0 if hwm_reset else None
    ids = torch.arange(16)[None] % 97 + 3
    with torch.no_grad():
        if who == "ours":
            model.attn_impl = "explicit"
            logits = model(ids)
        else:
            logits = model(ids).logits
    save_file({"logits": logits.float().contiguous()}, out)
    print(json.dumps({"seconds": seconds, "rise": after - before, "before": before, "hwm_rise": hwm_rise}))


def _status(field: str) -> int:
    """Bytes of a /proc/self/status field (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_hwm() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0); False elsewhere."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# A process inherits its parent's peak RSS across exec (Linux keeps the larger of the old and new
# ru_maxrss), so a worker started straight from this (large) process would report our own peak as
# its baseline. A bare Python launcher in between starts each worker from a ~10 MB parent.
_LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def measure(who: str, path: str, dtype: str, out: str) -> dict:
    cmd = [sys.executable, "-c", _LAUNCHER, sys.executable, os.path.abspath(__file__), "--worker", who,
           "--path", path, "--dtype", dtype, "--out", out]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if res.returncode != 0:
        raise RuntimeError(f"{who} {dtype} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------- main side
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a small config (smoke test)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of fresh-process measurements")
    p.add_argument("--no-limits", action="store_true", help="skip measuring the machine's limits")
    p.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--dtype", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.path, args.dtype, args.out)
        return 0

    import torch
    from safetensors.torch import load_file

    from _limits import measure_limits, print_limits, print_table

    if not args.no_limits:
        print_limits(measure_limits(threads=2))
    with tempfile.TemporaryDirectory() as tmp:
        path = build_checkpoint(os.path.join(tmp, "ckpt"), args.tiny)
        file_bytes = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
        from workbench.config import CommandRConfig

        n_params = CommandRConfig.from_pretrained(path).n_params
        print(f"\ncheckpoint: {'tiny' if args.tiny else 'mid'} config, {n_params / 1e6:.1f} M parameters, "
              f"fp32 safetensors {file_bytes / 1e6:.1f} MB; {args.repeat} round(s), each load in a fresh process\n")
        results = {(w, d): [] for d in DTYPES for w in ("hf", "ours")}
        order = list(results)
        for r in range(args.repeat):
            for who, dtype in order[r % len(order):] + order[:r % len(order)]:   # rotate the order
                out = os.path.join(tmp, f"{who}-{dtype}.safetensors")
                results[(who, dtype)].append(measure(who, path, dtype, out))
        rows = []
        goals = []
        for dtype in DTYPES:
            weight_bytes = n_params * torch.empty((), dtype=getattr(torch, dtype)).element_size()
            hf, ours = results[("hf", dtype)], results[("ours", dtype)]
            t_hf, t_ours = min(x["seconds"] for x in hf), min(x["seconds"] for x in ours)
            r_hf, r_ours = min(x["rise"] for x in hf), min(x["rise"] for x in ours)
            h_hf, h_ours = (min((x["hwm_rise"] for x in runs if x["hwm_rise"] is not None), default=float("nan"))
                            for runs in (hf, ours))
            a = load_file(os.path.join(tmp, f"hf-{dtype}.safetensors"))["logits"]
            b = load_file(os.path.join(tmp, f"ours-{dtype}.safetensors"))["logits"]
            diff = (a - b).abs().max().item()
            for who, runs, t, r, h in (("transformers", hf, t_hf, r_hf, h_hf), ("ours", ours, t_ours, r_ours, h_ours)):
                med = statistics.median(x["seconds"] for x in runs)
                rows.append([f"{who} fp32 file -> {dtype}", f"{t * 1e3:.0f} / {med * 1e3:.0f}",
                             f"{t / t_hf:.2f}x", f"{r / 1e6:.1f}", f"{r / weight_bytes:.2f}", f"{r / max(r_hf, 1):.2f}x",
                             f"{h / 1e6:.1f}", f"{diff:.1e}" if who == "ours" else "-"])
            goals.append((dtype, t_ours / t_hf, r_ours / max(r_hf, 1), r_ours / weight_bytes, r_ours / file_bytes))
        print_table(rows, ["contender", "load min / median ms", "time ratio", "ru_maxrss rise MB",
                           "rise / weight bytes", "rise ratio", "VmHWM rise MB", "max |Δ logits|"])
        print("\nweight bytes = parameters x bytes of the loaded dtype; ratios are ours / transformers;"
              "\nru_maxrss rise = peak RSS after the load - peak before it (an import-time peak can hide part"
              "\nof a load); VmHWM rise = peak RSS during the load - RSS at its start (peak reset just before)")
        for dtype, tr, rr, rw, rf in goals:
            cast = dtype != "float32"
            verdict = "ok" if tr <= 1.0 and rr <= 1.0 and (not cast or rf <= 1.2) else "MISSED"
            extra = f", rise = {rf:.2f} x the file's weight bytes (goal <= 1.2)" if cast else ""
            print(f"goal {dtype}: time ratio {tr:.2f} (<= 1.0), RSS-rise ratio {rr:.2f} (<= 1.0){extra}: {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
