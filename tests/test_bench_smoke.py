"""The bench scripts run (tiny config, one repetition) and their helpers count correctly.

No timing is asserted: timings live in bench/ output only (see bench/README.md).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
sys.path.insert(0, BENCH)

import _limits  # noqa: E402


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_bench_forward_tiny_runs_and_contenders_agree():
    out = subprocess.run(
        [sys.executable, os.path.join(BENCH, "bench_forward.py"), "--tiny", "--repeat", "1", "--warmup", "0",
         "--no-peers", "--no-eager", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "memory read bandwidth" in text and "fp32 matmul rate" in text
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0].startswith(("transformers ", "ours ")) and re.fullmatch(r"[\d.]+ / [\d.]+", cells[1]):
            rows[re.sub(r" \(all \d+ hooks\)", "", cells[0])] = float(cells[-1])
    assert set(rows) == {"transformers sdpa forward", "ours forward, no hooks",
                         "ours forward, explicit attention", "ours run_with_cache",
                         "ours run_with_cache, all but hook_result"}, text
    # every contender computed the reference's logits (the table would be meaningless otherwise)
    assert all(delta < 1e-4 for delta in rows.values()), rows
    assert re.search(r"^goals .*paired", text, re.M) and "ours forward <= 1.05x transformers sdpa" in text


def test_timeit_and_interleaved_count_every_repetition():
    calls = []
    t = _limits.timeit(lambda: calls.append(1), repeat=4, warmup=2)
    assert len(calls) == 6 and len(t.times) == len(t.cpu_times) == 4 and t.min <= t.median
    reported = _limits.timeit(lambda: _limits.Measured(wall=2.5, cpu=4.0), repeat=2, warmup=0)
    assert reported.times == [2.5, 2.5] and reported.cpu_min == 4.0
    order = []
    res = _limits.timeit_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                     repeat=3, warmup=1)
    assert order == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]    # warm-up, then rotating rounds
    assert len(res["a"].times) == len(res["b"].times) == 3
    with pytest.raises(ValueError, match="repeat"):
        _limits.timeit(lambda: None, repeat=0)


def test_print_table_aligns_and_rejects_ragged_rows(capsys):
    _limits.print_table([["ours", "1.0"], ["transformers", "10.25"]], ["contender", "ms"])
    lines = capsys.readouterr().out.splitlines()
    assert len({len(line) for line in lines}) == 1          # every line the same width
    assert lines[2].startswith("ours ") and lines[3].endswith("10.25")
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        _limits.print_table([["only one"]], ["a", "b"])


def test_forward_flops_matches_hand_count():
    cfg = types.SimpleNamespace(d_model=8, n_heads=2, n_kv_heads=1, d_head=4, d_mlp=16, vocab_size=10,
                                n_layers=2, layer_window=lambda i: None)
    T = 3
    proj = 8 * 8 + 2 * 8 * 4 + 8 * 8 + 3 * 8 * 16       # q, k+v, o, gate/up/down per token per layer
    linear = 2 * T * (2 * proj + 8 * 10)
    attn = 2 * (2 * 2 * 2 * 4 * (1 + 2 + 3))           # layers x (qk + pv) x heads x d_head x pairs
    assert _limits.forward_flops(cfg, T) == linear + attn
    windowed = types.SimpleNamespace(**{**vars(cfg), "layer_window": lambda i: 2})
    assert _limits.forward_flops(windowed, T) == linear + 2 * (2 * 2 * 2 * 4 * (1 + 2 + 2))


def test_quick_limits_are_positive():
    lim = _limits.measure_limits(threads=None, quick=True)
    assert lim.read_gbs > 0 and lim.copy_gbs > 0 and lim.matmul_peak > 0 and lim.matvec_gbs > 0


def test_run_all_lists_bench_forward():
    out = subprocess.run([sys.executable, os.path.join(BENCH, "run_all.py"), "--list"],
                         capture_output=True, text=True, timeout=60, env=_env(), cwd=REPO)
    assert out.returncode == 0 and "bench_forward.py" in out.stdout
