"""Peer libraries (TransformerLens' TransformerBridge, nnsight) timed in a worker subprocess.

The peers may need packages that must not touch the project's environment, so they usually live in
a separate interpreter: a venv created with ``--system-site-packages`` (it sees the same torch and
transformers) with ``pip install --no-deps transformer-lens nnsight`` plus their missing pure-Python
dependencies — see bench/README.md. This file is both

* the parent side: ``PeerWorker`` starts ``python bench/_peers.py --worker ...`` in that interpreter
  and turns each peer into a zero-argument callable, so the bench can interleave its repetitions
  with the in-process contenders (A B C A B C ...; the parent waits while the worker computes, so
  the two never compete for the cores); and
* the worker side (``__main__``): loads the peers from the LOCAL checkpoint folder (HF_HUB_OFFLINE=1),
  answers one JSON line per request on a private copy of stdout (anything the libraries print goes
  to stderr).

Example::

    worker = PeerWorker(ckpt, input_ids, peers=["transformer_lens"], threads=2)
    run = worker.contenders()["TransformerLens bridge run_with_cache"]
    run()                       # one repetition, timed by the caller
    worker.close()
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_MODULES = {"transformer_lens": "transformer_lens.model_bridge", "nnsight": "nnsight"}
DEFAULT_PEER_PYTHONS = ("/work/tl-venv/bin/python",)   # where bench/README.md creates the venv


# ------------------------------------------------------------------------------------ parent side
def _probe(python: str, module: str) -> Optional[dict]:
    """Versions seen by ``python`` if it can import ``module``, else None."""
    code = (f"import json, importlib, importlib.metadata as md, torch, transformers; importlib.import_module({module!r}); "
            f"print(json.dumps({{'torch': torch.__version__, 'transformers': transformers.__version__, "
            f"'version': md.version({module.split('.')[0].replace('_', '-')!r})}}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=180,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def find_peer_python(peer: str, explicit: Optional[str] = None) -> tuple:
    """(interpreter path or None, versions dict or reason string) for ``peer``.

    Tries ``explicit``, ``$WORKBENCH_PEER_PYTHON``, this interpreter, then the venv bench/README.md
    describes. An interpreter whose torch or transformers differ from this one's is refused: the
    comparison must run the same kernels.
    """
    import torch
    import transformers

    module = PEER_MODULES[peer]
    candidates = [explicit, os.environ.get("WORKBENCH_PEER_PYTHON"), sys.executable, *DEFAULT_PEER_PYTHONS]
    reasons = []
    for python in dict.fromkeys(c for c in candidates if c):
        if python != sys.executable and not os.path.exists(python):
            continue
        info = _probe(python, module)
        if info is None:
            reasons.append(f"{python}: cannot import {module}")
            continue
        if info["torch"] != torch.__version__ or info["transformers"] != transformers.__version__:
            reasons.append(f"{python}: torch {info['torch']} / transformers {info['transformers']} "
                           f"differ from {torch.__version__} / {transformers.__version__}")
            continue
        return python, info
    return None, "; ".join(reasons) or f"{module} not installed"


class PeerWorker:
    """One worker process holding the peers' models; ``contenders()`` gives callables to time."""

    def __init__(self, python: str, checkpoint: str, input_ids, peers: List[str], threads: int) -> None:
        self._log = tempfile.NamedTemporaryFile("w+", prefix="peer-worker-", suffix=".log", delete=False)
        self._out_dir = tempfile.mkdtemp(prefix="peer-logits-")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
        cmd = [python, os.path.join(HERE, "_peers.py"), "--worker", "--checkpoint", checkpoint,
               "--threads", str(threads), "--peers", ",".join(peers), "--out-dir", self._out_dir]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, env=env)
        self.ready = self._request({"ids": input_ids.tolist()})   # {"contenders": {...}, "errors": {...}}

    def _request(self, msg: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise RuntimeError(f"peer worker died; its log ({self._log.name}) ends:\n{self.log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"peer worker: {reply['error']}")
        return reply

    def log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        with open(self._log.name) as f:
            return f.read()[-n:]

    @property
    def errors(self) -> Dict[str, str]:
        """peer -> why it could not be loaded in the worker."""
        return self.ready.get("errors", {})

    def contenders(self) -> Dict[str, Callable[[], object]]:
        """name -> zero-argument callable running one repetition in the worker; it returns the
        worker's own wall and CPU time (``_limits.Measured``), so pipe latency is not counted."""
        from _limits import Measured

        def run(name):
            r = self._request({"run": name})
            return Measured(r["wall"], r["cpu"])

        return {name: (lambda name=name: run(name)) for name in self.ready["contenders"]}

    def logits(self, name: str):
        """The logits contender ``name`` produced, [batch pos vocab] (read from a safetensors file)."""
        from safetensors.torch import load_file

        path = self._request({"logits": name})["path"]
        return load_file(path)["logits"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self._request({"quit": True})
            except RuntimeError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
        os.unlink(self._log.name)


# ------------------------------------------------------------------------------------ worker side
def _load_peers(checkpoint: str, peers: List[str]):
    """name -> (callable(ids) -> logits); errors: peer -> reason."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    contenders, errors = {}, {}
    if "transformer_lens" in peers:
        try:
            from transformer_lens.model_bridge import TransformerBridge

            bridge = TransformerBridge.boot_transformers(checkpoint, device="cpu", dtype=torch.float32)
            bridge.eval()
            contenders["TransformerLens bridge forward"] = lambda ids: bridge(ids, return_type="logits")
            contenders["TransformerLens bridge run_with_cache"] = lambda ids: bridge.run_with_cache(ids)[0]
        except Exception as e:  # report, don't crash the bench
            errors["transformer_lens"] = f"{type(e).__name__}: {e}"
    if "nnsight" in peers:
        try:
            import warnings

            from nnsight import LanguageModel

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lm = LanguageModel(checkpoint, dispatch=True, dtype=torch.float32, attn_implementation="sdpa")
            lm.eval()

            def trace(ids):
                saved = []
                with lm.trace(ids):
                    for layer in lm.model.layers:
                        saved.append(layer.output.save())
                    logits = lm.output.logits.save()
                if len(saved) != len(lm.model.layers):
                    raise RuntimeError("nnsight saved fewer layer outputs than layers")
                return logits

            contenders["nnsight trace, save every layer output"] = trace
        except Exception as e:
            errors["nnsight"] = f"{type(e).__name__}: {e}"
    return contenders, errors


def _worker(argv: List[str]) -> None:
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--worker", action="store_true")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peers", default="transformer_lens,nnsight")
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)
    proto = os.fdopen(os.dup(1), "w")       # protocol channel; libraries' prints go to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    ids = None
    contenders, errors = {}, {}
    for line in sys.stdin:
        msg = json.loads(line)
        try:
            if "ids" in msg:
                ids = torch.tensor(msg["ids"], dtype=torch.long)
                contenders, errors = _load_peers(args.checkpoint, args.peers.split(","))
                reply({"contenders": list(contenders), "errors": errors})
            elif "run" in msg:
                import gc
                import time

                gc.collect()
                c0, t0 = time.process_time(), time.perf_counter()
                with torch.no_grad():
                    contenders[msg["run"]](ids)
                reply({"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0})
            elif "logits" in msg:
                with torch.no_grad():
                    logits = contenders[msg["logits"]](ids)
                path = os.path.join(args.out_dir, f"{len(os.listdir(args.out_dir))}.safetensors")
                save_file({"logits": logits.detach().float().contiguous()}, path)
                reply({"path": path})
            elif "quit" in msg:
                reply({"ok": True})
                return
        except Exception as e:
            reply({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    _worker(sys.argv[1:])
