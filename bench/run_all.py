"""Run every ``bench/bench_*.py``, each in a fresh subprocess, and print their tables.

Each bench gets its own interpreter so one bench's allocations, thread pools and imported peers
cannot colour the next one's timings. Output streams through as it comes; a summary with each
bench's exit status and wall time closes the run, and the exit status is non-zero if any failed.

Run::

    python bench/run_all.py                       # every bench, default settings
    python bench/run_all.py --only forward        # bench_forward.py only
    python bench/run_all.py -- --repeat 3         # extra arguments passed to every bench
    python bench/run_all.py --list
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _limits import print_table  # noqa: E402


def discover(only=None) -> list:
    """Paths of bench/bench_*.py, sorted; ``only`` keeps names containing any of the given words."""
    paths = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    if only:
        paths = [p for p in paths if any(w in os.path.basename(p) for w in only)]
    return paths


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description="Run every bench/bench_*.py in a fresh subprocess.")
    p.add_argument("--only", nargs="+", help="run only benches whose file name contains one of these")
    p.add_argument("--list", action="store_true", help="list the benches and exit")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per bench")
    args = p.parse_args(argv)
    paths = discover(args.only)
    if args.list or not paths:
        print("\n".join(os.path.relpath(x) for x in paths) or "no bench matched")
        return 0 if paths or args.list else 1
    summary = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    for path in paths:
        name = os.path.basename(path)
        print(f"\n{'=' * 20} {name} {'=' * 20}", flush=True)
        t0 = time.perf_counter()
        try:
            rc = subprocess.run([sys.executable, path, *extra], env=env, timeout=args.timeout).returncode
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            rc, status = 1, f"timed out after {args.timeout:.0f} s"
        summary.append((name, status, f"{time.perf_counter() - t0:.0f} s", rc))
    print()
    print_table([row[:3] for row in summary], ["bench", "status", "wall"])
    return 0 if all(row[3] == 0 for row in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
