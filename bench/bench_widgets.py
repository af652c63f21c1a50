"""Kernel time to update every live view for one generated token (GenerationView.on_step), on the bundled model.

Since issue 21 the views are updated in **frames** (at most one every ``frame_interval`` = 0.1 s, and only after
the page acknowledged the previous one; in this bench there is no page, so frames go out on the interval): a
step stores its numbers, a frame sends only the new tokens and the windows on screen. Both are measured: the
default view, and ``frame_interval=0`` (a frame after every step, the old behaviour's message rate).

Budget (issue 8): ≤ 100 ms of kernel time per generated token for the token stream, the attention view and the
logit-lens view together. What is timed is the Python side of one ``on_step(StepInfo)``: token records for
the whole sequence, storing the step's attention rows and re-slicing the heatmap window / max-pooled thumbnails
/ query row, the logit lens of the new position (``workbench.analysis.logit_lens``), and serialising every
changed trait the way the kernel does (``jupyter_client``'s JSON packer plus the binary buffers) into a
recording comm. The browser's rendering is not kernel time and is not counted.

Contenders, side by side on the same prompt (repetitions interleaved round-robin, min / median):

* ``generate`` alone: the model's own per-token cost (fused attention, nothing captured);
* ``generate`` + the views' capture (every layer's hook_pattern, resid_pre of every layer, last resid_post)
  with a no-op ``on_step``: what capturing costs the model;
* ``generate`` + ``GenerationView``: everything; the views' own share is reported per step from the
  ``on_step`` timings (min / median / p95 / max) with the bytes each step sends.

Run::

    python bench/bench_widgets.py                 # bundled command-r-tiny, prompts of 16 and 500 tokens
    python bench/bench_widgets.py --tiny          # smoke run, seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from _limits import machine_line, measure_limits, print_limits, print_table, timeit_interleaved  # noqa: E402

BUDGET_MS = 100.0


class Recorder:
    """Stands in for the kernel's comm: packs every widget message as the kernel would and counts the bytes."""

    def __init__(self) -> None:
        from jupyter_client.session import json_packer

        self.pack, self.bytes, self.messages = json_packer, 0, 0

    def install(self) -> None:
        import comm
        from comm.base_comm import BaseComm

        recorder = self

        class RecordingComm(BaseComm):
            def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
                recorder.messages += 1
                recorder.bytes += len(recorder.pack({"data": data, "metadata": metadata or {}}))
                recorder.bytes += sum(len(memoryview(b).cast("B")) for b in buffers or ())

        comm.create_comm = lambda *a, **k: RecordingComm(*a, **k)


def load(tiny: bool):
    from workbench import CommandRConfig, HookedCommandR
    from workbench.tokenizer import Tokenizer

    try:
        if tiny:
            raise KeyError("--tiny")
        from workbench.bundled import resolve_model_path

        path = resolve_model_path("command-r-tiny")
        return HookedCommandR.from_pretrained(path).eval(), Tokenizer.from_pretrained(path), "command-r-tiny"
    except (KeyError, FileNotFoundError, ImportError):
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from test_widgets import small_tokenizer  # a byte-level BPE built in memory

        tok = small_tokenizer()
        cfg = CommandRConfig(vocab_size=1792, d_model=64 if tiny else 256, n_layers=4, n_heads=8, n_kv_heads=2,
                             d_mlp=704, use_qk_norm=True, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        return HookedCommandR.from_config(cfg, seed=0).eval(), tok, "random (command-r-tiny shape)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="smoke run: small random model, short prompts")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--new", type=int, default=32, help="tokens generated per run")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recorder = Recorder()
    recorder.install()
    from workbench.widgets import GenerationView
    from workbench.analysis import lens_resid_names

    model, tok, source = load(args.tiny)
    if args.tiny:
        print(f"machine: {machine_line()}")
    else:
        print_limits(measure_limits(threads=args.threads))
    cfg = model.cfg
    print(f"model: {source} (d_model {cfg.d_model}, {cfg.n_layers} layers × {cfg.n_heads} heads, vocab "
          f"{cfg.vocab_size}, {model.dtype}); {args.new} new tokens, EOS off, greedy; threads {args.threads}")
    names = {f"blocks.{i}.attn.hook_pattern" for i in range(cfg.n_layers)} | set(lens_resid_names(cfg.n_layers))
    base = "The cat sat on the mat. 안녕하세요 👋 " * 40
    lengths = (16, 64) if args.tiny else (16, 500)
    rows, view_rows = [], []
    for n_prompt in lengths:
        ids = tok.encode(base)[:n_prompt]
        prompt = torch.tensor([ids])
        kw = dict(max_new_tokens=args.new, eos_token_id=[])
        views: list = []

        every: list = []

        def with_view(interval=0.1, into=views):
            view = GenerationView(model, tok, ids, max_new_tokens=args.new, eos_token_id=[], frame_interval=interval)
            before = recorder.bytes
            view.run()
            view.bytes_sent = recorder.bytes - before
            into.append(view)

        timings = timeit_interleaved({
            "generate": lambda: model.generate(prompt, **kw),
            "generate + capture": lambda: model.generate(prompt, capture=lambda n: n in names,
                                                         on_step=lambda info: None, **kw),
            "generate + GenerationView": with_view,
            "generate + GenerationView, a frame every step": lambda: with_view(0.0, every),
        }, repeat=args.repeat, warmup=1)
        ref = timings["generate"].min
        for name, t in timings.items():
            rows.append([n_prompt, name, f"{t.min / args.new * 1e3:.2f}", f"{t.median / args.new * 1e3:.2f}",
                         f"{t.min / ref:.2f}"])
        steps = [s * 1e3 for v in views for s in v.step_times[1:]]     # decode steps (step 0 is the prefill)
        prefill = [v.step_times[0] * 1e3 for v in views]
        steps.sort()
        p95 = steps[min(len(steps) - 1, int(0.95 * len(steps)))]
        per_step_kb = statistics.median(v.bytes_sent / len(v.step_times) for v in views) / 1024
        per_step_every = statistics.median(v.bytes_sent / len(v.step_times) for v in every) / 1024
        frames = statistics.median(len(v.frame_times) for v in views)
        frame_ms = statistics.median(f * 1e3 for v in views for f in v.frame_times)
        view_rows.append([n_prompt, f"{min(prefill):.1f}", f"{steps[0]:.1f}", f"{statistics.median(steps):.1f}",
                          f"{p95:.1f}", f"{steps[-1]:.1f}", f"{frames:.0f}", f"{frame_ms:.1f}", f"{per_step_kb:.1f}",
                          f"{per_step_every:.1f}", "yes" if statistics.median(steps) <= BUDGET_MS else "NO"])
    print("\nwhole generation, per generated token (ms; ratio = min / generate's min)")
    print_table(rows, ["prompt", "contender", "min ms/tok", "median ms/tok", "ratio"])
    print(f"\nGenerationView.on_step: kernel time to update every view for one token (ms), budget {BUDGET_MS:.0f} ms")
    print_table(view_rows, ["prompt", "prefill step", "min", "median", "p95", "max", "frames", "ms/frame",
                            "KiB sent/step", "KiB/step (frame every step)", "median ≤ budget"])


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"\n({time.time() - t0:.0f} s)")
