"""``backend="ray"``: one Ray actor per worker loads the model once; the driver hands out shards.

Each actor (``ShardWorker``) loads ``HookedCommandR.from_pretrained(name, **model_kwargs)`` once, reports its
weights fingerprint (the driver refuses workers that disagree with each other or with ``out_dir``'s manifest
before any shard runs), then computes shards with the same ``run_shard`` as the local backend and writes them
straight into ``out_dir`` (temporary name + atomic rename), so results never pass through the driver. An actor
that dies (out of memory, node lost, killed) has its shard handed to another live actor, up to
``max_retries`` times; an exception raised by the task itself (a bug in ``fn``) is re-raised at once.

Resources: with GPUs in the cluster each actor takes ``num_gpus=1`` (and loads on ``"cuda"`` unless
``model_kwargs`` says where); otherwise each takes ``worker_threads`` CPUs and sets torch to that many threads.

Cluster: ``ray_address="auto"`` (or ``"ray://host:10001"``) joins a running cluster; ``out_dir`` must then be on
a filesystem every node sees under the same path (NFS, Lustre, a mounted bucket with atomic rename), and the
workbench must be importable on every node. Without ``ray_address`` a Ray instance already initialised in this
process is used (and left running); otherwise a local one is started for the call and shut down after it.

Ray is an optional dependency (``pip install "commandr-workbench[distributed]"``); it is imported only when
this backend runs.
"""

from __future__ import annotations

import collections
import os
from typing import Optional

import torch

from ..fingerprint import config_fingerprint, weights_fingerprint
from ..model import HookedCommandR
from .local import run_shard

FAULT_ENV = "WORKBENCH_EXPERIMENTS_FAULT"     # test-only: "exit-mid-shard" makes worker 0 die in its first shard
START_TIMEOUT_S = 900


def require_ray():
    """The ``ray`` module, or a clear ImportError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError('backend="ray" needs Ray: pip install "commandr-workbench[distributed]" '
                          '(or pip install "ray>=2.9"); backend="local" needs nothing more') from None
    return ray


class ShardWorker:
    """The actor body: holds one loaded model and computes the shards the driver sends."""

    def __init__(self, model_name: str, model_kwargs: dict, threads: Optional[int], fault: Optional[str] = None):
        if threads:
            torch.set_num_threads(threads)
        self.model = HookedCommandR.from_pretrained(model_name, **model_kwargs)
        self.fault = fault
        self.shards_started = 0
        self.job: Optional[tuple] = None

    def fingerprints(self) -> tuple:
        return weights_fingerprint(self.model), config_fingerprint(self.model.cfg)

    def setup(self, task, tokens: list, batch_size: int, pad_id: int, out_dir: str, rid: str) -> bool:
        self.job = (task, tokens, batch_size, pad_id, out_dir, rid)
        return True

    def run(self, plan) -> dict:
        task, tokens, batch_size, pad_id, out_dir, rid = self.job
        on_batch = None
        if self.fault == "exit-mid-shard" and self.shards_started == 0:
            on_batch = _die                 # after the shard's first batch, before its file is written
        self.shards_started += 1
        report = run_shard(self.model, task, plan, tokens, batch_size, pad_id, out_dir, rid, on_batch=on_batch)
        report["pid"] = os.getpid()
        return report


def _die(_n: int) -> None:
    os._exit(17)


class RayPool:
    """A set of ``ShardWorker`` actors for one call; a context manager that also owns a local Ray instance."""

    def __init__(self, model_name: str, model_kwargs: Optional[dict], num_workers: Optional[int],
                 ray_address: Optional[str] = None, worker_threads: int = 1, max_retries: int = 2) -> None:
        self.ray = require_ray()
        self.model_name, self.model_kwargs = model_name, dict(model_kwargs or {})
        self.num_workers, self.ray_address = num_workers, ray_address
        self.worker_threads, self.max_retries = worker_threads, max_retries
        self.started_ray = False
        self.actors: list = []
        self.retried: list = []

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "RayPool":
        ray = self.ray
        if not ray.is_initialized():
            if self.ray_address is not None:
                ray.init(address=self.ray_address, log_to_driver=False)
            else:
                want = (self.num_workers or 1) * self.worker_threads
                ray.init(num_cpus=max(os.cpu_count() or 1, want), include_dashboard=False, log_to_driver=False)
            self.started_ray = True
        try:
            self._start_actors()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for actor in self.actors:
            try:
                self.ray.kill(actor)
            except Exception:
                pass
        self.actors = []
        if self.started_ray:
            self.ray.shutdown()

    def _start_actors(self) -> None:
        ray = self.ray
        gpus = int(ray.cluster_resources().get("GPU", 0))
        n = self.num_workers or (gpus if gpus else max(1, int(ray.cluster_resources().get("CPU", 1)) // self.worker_threads))
        if gpus:
            options = {"num_gpus": 1, "num_cpus": 1}
            placed = {"device", "device_map"} & set(self.model_kwargs)
            kwargs = self.model_kwargs if placed else {**self.model_kwargs, "device": "cuda"}
            threads = None
        else:
            options = {"num_cpus": self.worker_threads}
            kwargs, threads = self.model_kwargs, self.worker_threads
        fault = os.environ.get(FAULT_ENV)
        remote = ray.remote(**options)(ShardWorker)
        self.actors = [remote.remote(self.model_name, kwargs, threads, fault if i == 0 else None) for i in range(n)]
        self.alive = list(range(n))

    def fingerprints(self) -> tuple:
        """(weights, config) fingerprints every worker agrees on; waits for the models to load."""
        refs = [a.fingerprints.remote() for a in self.actors]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=START_TIMEOUT_S)
        if len(ready) < len(refs):
            raise TimeoutError(f"only {len(ready)} of {len(refs)} Ray workers loaded the model within "
                               f"{START_TIMEOUT_S} s; cluster resources: {self.ray.cluster_resources()}")
        found = self.ray.get(refs)
        if len(set(found)) != 1:
            raise RuntimeError(f"Ray workers loaded different weights from {self.model_name!r}: "
                               f"{sorted(set(f[0][:12] for f in found))}")
        return found[0]

    # ------------------------------------------------------------------ scheduling
    def run(self, task, todo: list, tokens: list, batch_size: int, pad_id: int, out_dir: str, rid: str,
            bar=None) -> list:
        """Compute the ``todo`` shards over the actors (longest prompts first); returns their reports."""
        ray = self.ray
        tokens_ref = ray.put(tokens)
        ray.get([a.setup.remote(task, tokens_ref, batch_size, pad_id, out_dir, rid) for a in self.actors])
        queue = collections.deque((plan, 0, frozenset()) for plan in reversed(todo))
        pending: dict = {}
        free = list(self.alive)
        reports = []
        while queue or pending:
            while queue and free:
                plan, tries, avoid = queue.popleft()
                pick = next((a for a in free if a not in avoid), free[0])
                free.remove(pick)
                pending[self.actors[pick].run.remote(plan)] = (pick, plan, tries, avoid)
            (done,), _ = ray.wait(list(pending), num_returns=1)
            actor, plan, tries, avoid = pending.pop(done)
            try:
                report = ray.get(done)
            except ray.exceptions.RayActorError as e:
                self._lost(actor, plan, tries, e)
                queue.appendleft((plan, tries + 1, avoid | {actor}))
                continue
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None
            report["worker"] = actor
            reports.append(report)
            free.append(actor)
            if bar is not None:
                bar.update(report["prompts"])
        return reports

    def _lost(self, actor: int, plan, tries: int, error) -> None:
        if actor in self.alive:
            self.alive.remove(actor)
        self.retried.append({"shard": plan.index, "worker": actor, "error": type(error).__name__})
        if tries + 1 > self.max_retries:
            raise RuntimeError(f"shard {plan.index} ({plan.file}) failed on {tries + 1} Ray workers; last error: "
                               f"{error}") from None
        if not self.alive:
            raise RuntimeError(f"every Ray worker died; last error while computing shard {plan.index}: {error}")
