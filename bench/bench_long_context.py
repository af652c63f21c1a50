"""Long-context attention: peak memory and time of a hooked pattern, selected rows and span masses
against transformers' eager ``output_attentions`` and our plain (fused) forward.

Every measurement runs in a fresh subprocess (``--child``): peak RSS increase over the RSS just
before the call (Linux: ``/proc/self/clear_refs`` resets the peak, ``VmHWM`` reads it), and the wall
best wall time of two calls (after a 64-token warm-up forward). One random layer at a small width (default
d_model 64, 2 heads, fp32), so the attention dominates. Contenders whose estimated peak (the 4k
measurement scaled by (n / 4096)^2 for the quadratic ones) exceeds ``--max-gib`` are skipped.

    python bench/bench_long_context.py                       # 4k / 16k / 32k tokens
    python bench/bench_long_context.py --tokens 4096 --compare-repo /work/main
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUADRATIC = {"hf_eager_attentions", "ours_hooked_pattern"}
LABELS = {
    "ours_fused": "ours forward (fused, no hooks)",
    "ours_hooked_pattern": "ours forward + hook_pattern kept",
    "ours_rows16": "attention_rows, 16 queries, all heads",
    "ours_spans_all": "attention_to_spans, all queries, 8 spans",
    "hf_eager_attentions": "transformers eager, output_attentions",
}


def child(mode: str, n: int, ckpt: str) -> dict:
    import torch

    torch.set_num_threads(2)
    ids = torch.randint(7, 250, (1, n), generator=torch.Generator().manual_seed(0))
    if mode.startswith("hf_"):
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
        run = lambda: model(ids, output_attentions=True).attentions                     # noqa: E731
        warm = lambda: model(ids[:, :64])                                                # noqa: E731
    else:
        from workbench import HookedCommandR
        try:
            from workbench.hook_names import act_name
        except ImportError:                          # --compare-repo: a checkout older than the vocabulary
            act_name = lambda kind, layer: f"blocks.{layer}.attn.hook_{kind}"          # noqa: E731

        if mode in ("ours_rows16", "ours_spans_all"):
            from workbench.analysis import attention_rows, attention_to_spans
        model = HookedCommandR.from_pretrained(ckpt)
        warm = lambda: model(ids[:, :64])                                                # noqa: E731
        if mode == "ours_fused":
            run = lambda: model(ids)                                                     # noqa: E731
        elif mode == "ours_hooked_pattern":
            kept = []
            run = lambda: model.run_with_hooks(                                          # noqa: E731
                ids, fwd_hooks=[(act_name("pattern", 0), lambda x, hook: kept.append(x))])
        elif mode == "ours_rows16":
            run = lambda: attention_rows(model, ids, queries=list(range(-16, 0)))       # noqa: E731
        elif mode == "ours_spans_all":
            edges = [round(i * n / 8) for i in range(9)]
            run = lambda: attention_to_spans(model, ids, list(zip(edges[:-1], edges[1:])))  # noqa: E731
        else:
            raise SystemExit(f"unknown mode {mode}")
    with torch.no_grad():
        warm()
        try:
            open("/proc/self/clear_refs", "w").write("5")
        except OSError:
            pass
        before = _status("VmRSS")
        t0 = time.perf_counter()
        out = run()
        wall = time.perf_counter() - t0
        peak = _status("VmHWM")
        del out
        t0 = time.perf_counter()
        run()                                              # a second run: time without first-touch costs
        wall = min(wall, time.perf_counter() - t0)
    return {"increase": peak - before, "wall": wall}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure(mode: str, n: int, ckpt: str, repo: str) -> dict:
    env = {**os.environ, "PYTHONPATH": repo, "OMP_NUM_THREADS": "2", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, os.path.abspath(__file__), "--child", mode, "--tokens", str(n), "--ckpt", ckpt]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tempfile.gettempdir(), timeout=1800)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 32768])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--max-gib", type=float, default=6.0, help="skip contenders estimated to need more")
    p.add_argument("--modes", default=",".join(LABELS))
    p.add_argument("--compare-repo", help="also run ours_hooked_pattern from another checkout (e.g. main)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens[0], args.ckpt)))
        return
    sys.path.insert(0, os.path.join(REPO, "bench"))
    from _checkpoint import build_checkpoint
    from _limits import machine_line, print_table

    print(machine_line())
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = build_checkpoint(tmp, vocab_size=256, hidden_size=args.d_model, intermediate_size=2 * args.d_model,
                                num_hidden_layers=1, num_attention_heads=args.heads,
                                num_key_value_heads=args.heads, use_qk_norm=False,
                                max_position_embeddings=max(args.tokens))
        contenders = [(m, REPO) for m in modes]
        if args.compare_repo:
            contenders.append(("ours_hooked_pattern", os.path.abspath(args.compare_repo)))
        first: dict = {}
        failed: set = set()
        rows = []
        for n in sorted(args.tokens):
            pattern = args.heads * n * n * 4
            for mode, repo in contenders:
                label = LABELS[mode] + ("" if repo == REPO else f" [{os.path.basename(repo)}]")
                key = (mode, repo)
                if key in failed:
                    continue
                if mode in QUADRATIC:                # unmeasured: assume 3x the pattern (transformers: ~2.6x)
                    n0, inc0 = first.get(key, (n, 3 * pattern))
                    estimate = inc0 * (n / n0) ** 2
                    if estimate > args.max_gib * 2**30:
                        rows.append([n, label, f"skipped (est. {estimate / 2**30:.1f} GiB)", "", "", ""])
                        continue
                r = measure(mode, n, ckpt, repo)
                if "error" in r:
                    failed.add(key)
                    rows.append([n, label, "error: " + r["error"][:60], "", "", ""])
                    continue
                first.setdefault(key, (n, r["increase"]))
                rows.append([n, label, f"{r['increase'] / 2**20:,.0f}", f"{r['increase'] / pattern:.2f}",
                             f"{r['wall']:.2f}", f"{pattern / 2**20:,.0f}"])
                print(f"  {n:>6} {label}: {r['increase'] / 2**20:,.0f} MiB, {r['wall']:.2f} s", flush=True)
    print()
    print_table(rows, ["tokens", "contender", "peak RSS increase MiB", "x pattern bytes", "wall s",
                       "one layer's pattern MiB"])


if __name__ == "__main__":
    main()
