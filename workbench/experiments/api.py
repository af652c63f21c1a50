"""``collect_activations`` and ``map_prompts``: check everything, plan or resume, run a backend, finish.

Both follow the same ladder: resolve the model (loaded here, or built on ``meta`` from its config when Ray
workers load it) -> validate hook names and prompts -> read ``out_dir``'s manifest and refuse another run's
data -> fingerprint the weights -> write the manifest -> compute the missing shards (local loop or Ray
actors) -> mark the manifest complete. Every refusal happens before the first shard is computed.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..config import CommandRConfig, dtype_name, parse_dtype
from ..fingerprint import config_fingerprint, weights_fingerprint
from ..hook_points import HookError
from ..loading import resolve_model_path
from ..model import HookedCommandR
from ..tokenizer import Tokenizer
from .batching import (ShardPlan, callable_label, inputs_fingerprint, normalize_inputs, plan_shards, positions_label,
                       select_positions)
from .dataset import ActivationDataset
from .local import ActivationTask, MapTask, run_local
from .ray_backend import RayPool, require_ray
from .store import (build_manifest, check_same_run, read_manifest, remove_stale_temporaries, shard_done,
                    tensor_table, write_manifest)

BACKENDS = ("local", "ray")
SHARD_BATCHES = 4        # default shard: this many batches (resume granularity; RAM holds one shard)


def _noop(x, hook):
    return None


def _resolve_model(model, backend: str, model_kwargs: Optional[dict]):
    """(loaded model or None, model for checks (maybe on meta), name or None)."""
    if isinstance(model, torch.nn.Module):
        if backend == "ray":
            raise ValueError('backend="ray": each worker loads the model itself; pass its name or path (and '
                             "model_kwargs), not a loaded model")
        if model_kwargs:
            raise ValueError("model_kwargs are for loading a model by name/path; the model given is already loaded")
        if not hasattr(model, "hook_dict") or not hasattr(model, "cfg"):
            raise TypeError(f"model: expected a HookedCommandR, got {type(model).__name__}")
        return model, model, getattr(model, "name_or_path", None)
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model: expected a HookedCommandR, a checkpoint folder or a bundled model name, got "
                        f"{type(model).__name__}")
    name = os.fspath(model)
    if backend == "ray":
        cfg = CommandRConfig.from_pretrained(resolve_model_path(name))
        return None, HookedCommandR.from_config(cfg, device="meta"), name
    loaded = HookedCommandR.from_pretrained(name, **dict(model_kwargs or {}))
    return loaded, loaded, name


def _check_hooks(model, hook_names) -> list:
    if isinstance(hook_names, str):
        hook_names = [hook_names]
    names = list(hook_names or ())
    if not names or not all(isinstance(n, str) for n in names):
        raise HookError(f"hook_names: expected one or more hook names (strings), got {hook_names!r}")
    if len(set(names)) != len(names):
        raise HookError(f"hook_names: {names} names a hook twice")
    with model.hooks(fwd_hooks=[(n, _noop) for n in names]):      # unknown names raise with the closest ones
        pass
    axes = {row["name"]: row["axes"] for row in model.hook_table(batch=1, pos=1)}
    for n in names:
        if not axes[n].startswith("batch pos"):
            raise HookError(f"hook {n!r} has axes [{axes[n]}]; collect_activations stores [batch pos ...] hooks "
                            "(for attention patterns, write a map_prompts fn that keeps what you need)")
    return names


class _LazyTokenizer:
    """The model folder's tokenizer, loaded only if a prompt is a string."""

    def __init__(self, name: str) -> None:
        self.name, self.tok = name, None

    def encode(self, text: str) -> list:
        if self.tok is None:
            self.tok = Tokenizer.from_pretrained(resolve_model_path(self.name))
        return self.tok.encode(text)


def _run(kind: str, model, inputs, task_args: dict, out_dir, batch_size: int, backend: str, num_workers,
         model_kwargs, progress, ray_address, tokenizer, shard_size, worker_threads: int, max_retries: int):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "local" and num_workers not in (None, 1):
        raise ValueError('num_workers is for backend="ray"; the local backend runs one process')
    if backend == "ray":
        require_ray()
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    out_dir = os.fspath(out_dir)
    loaded, checker, name = _resolve_model(model, backend, model_kwargs)
    cfg = checker.cfg
    tok = tokenizer if tokenizer is not None else (_LazyTokenizer(name) if name is not None else None)
    tokens = normalize_inputs(inputs, tok, cfg.vocab_size)
    identity = {"kind": kind, "model": {"name": name, "config_fingerprint": config_fingerprint(cfg),
                                        "weights_fingerprint": None, "config": cfg.fingerprint()},
                "inputs_fingerprint": inputs_fingerprint(tokens), "hook_names": None, "fn": None,
                "positions": None, "dtype": None}
    rows = None
    if kind == "activations":
        names = _check_hooks(checker, task_args["hook_names"])
        rows = select_positions(task_args["positions"], tokens)
        out_dtype = parse_dtype(task_args["dtype"])
        identity.update(hook_names=names, positions=positions_label(task_args["positions"]),
                        dtype=dtype_name(out_dtype))
        task = ActivationTask(names, rows, out_dtype)
    else:
        fn = task_args["fn"]
        if not callable(fn):
            raise TypeError(f"fn: expected a callable fn(model, batch) -> dict, got {type(fn).__name__}")
        identity["fn"] = callable_label(fn)
        task = MapTask(fn)

    existing = read_manifest(out_dir)
    if existing is not None:          # everything but the weights can be checked before any model loads
        check_same_run(existing, {**identity, "model": {**identity["model"],
                                                        "weights_fingerprint": existing["model"]["weights_fingerprint"]}},
                       out_dir)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    pool = RayPool(name, model_kwargs, num_workers, ray_address, worker_threads, max_retries) if backend == "ray" else None
    with pool if pool is not None else contextlib.nullcontext():
        if pool is not None:
            wfp, cfp = pool.fingerprints()
            if cfp != identity["model"]["config_fingerprint"]:
                raise RuntimeError(f"Ray workers loaded a model whose config differs from {name!r}'s config.json")
        else:
            wfp = weights_fingerprint(loaded)
        identity["model"]["weights_fingerprint"] = wfp
        if existing is not None:
            check_same_run(existing, identity, out_dir)
            manifest = existing
            plans = [ShardPlan(i, s["prompts"]) for i, s in enumerate(existing["shards"])]
        else:
            size = shard_size if shard_size is not None else batch_size * SHARD_BATCHES
            plans = plan_shards(tokens, size)
            manifest = build_manifest(identity, plans, tokens, rows, size)
            write_manifest(out_dir, manifest)
        rid = manifest["run_id"]
        todo = [p for p in plans if not shard_done(out_dir, p.file, rid)]
        skipped = [p.index for p in plans if p not in todo]
        bar = _bar(progress, len(tokens), sum(len(p.prompt_ids) for p in plans if p.index in skipped), kind)
        start = time.perf_counter()
        try:
            if pool is not None:
                reports = pool.run(task, todo, tokens, batch_size, pad_id, out_dir, rid, bar)
            else:
                reports = run_local(loaded, task, todo, tokens, batch_size, pad_id, out_dir, rid, bar)
        finally:
            if bar is not None:
                bar.close()
        retried = list(pool.retried) if pool is not None else []
    manifest["tensors"] = tensor_table(out_dir, plans[0].file)
    manifest["complete"] = True
    write_manifest(out_dir, manifest)
    remove_stale_temporaries(out_dir)
    ds = ActivationDataset(out_dir)
    ds.last_run = {"computed": sorted(r["shard"] for r in reports), "skipped": skipped, "retried": retried,
                   "workers": sorted({r["worker"] for r in reports if "worker" in r}), "backend": backend,
                   "seconds": time.perf_counter() - start}
    return ds


def _bar(progress, total: int, initial: int, kind: str):
    if not progress:
        return None
    return tqdm(total=total, initial=initial, unit="prompt", desc="activations" if kind == "activations" else "map")


def collect_activations(model, inputs, hook_names: Union[str, Sequence[str]], out_dir, batch_size: int = 8,
                        backend: str = "local", num_workers: Optional[int] = None, positions="all", dtype=None,
                        model_kwargs: Optional[dict] = None, progress: bool = True, ray_address: Optional[str] = None,
                        *, tokenizer=None, shard_size: Optional[int] = None, worker_threads: int = 1,
                        max_retries: int = 2) -> ActivationDataset:
    """Record ``hook_names`` over a dataset of prompts into ``out_dir``; returns its ``ActivationDataset``.

    ``model``: a loaded ``HookedCommandR`` (local backend), or a checkpoint folder / bundled model name loaded
    with ``model_kwargs`` (in this process, or once in each Ray worker). ``inputs``: token-id lists or 1-D
    tensors, strings (encoded by ``tokenizer``, by default the model folder's tokenizer), or a
    ``datasets.Dataset`` column. Prompts are sorted by length and run in left-padded, masked batches of
    ``batch_size`` (positions as ``generate`` gives them), so every stored row equals ``run_with_cache`` on
    its prompt alone; only real positions are stored: ``positions`` "all", "last", or
    ``fn(token_ids) -> positions or bool mask``. ``dtype`` casts what is stored (e.g. "float16").

    Results go to ``out_dir`` as shards of ``shard_size`` prompts (default ``4 * batch_size``) plus
    ``manifest.json``; each shard is written to a temporary name and renamed when complete. Calling again with
    the same ``out_dir`` computes only the missing shards (resume: the manifest's shard plan is kept), and
    refuses, before any work, a different model config, weights, hook set, positions, dtype or prompt list.

    ``backend="ray"`` (``pip install "commandr-workbench[distributed]"``) runs ``num_workers`` Ray actors (one
    GPU each when the cluster has GPUs, else ``worker_threads`` CPU threads each), retrying a shard whose actor
    died on another actor up to ``max_retries`` times; ``ray_address="auto"`` joins a running cluster, whose
    nodes must all see ``out_dir`` at the same path (a shared filesystem). See ``docs/experiments.md``.

    Example::

        ds = collect_activations("command-r-tiny", texts, ["blocks.2.hook_resid_post"], "acts/", batch_size=16)
        ds[0]["blocks.2.hook_resid_post"].shape          # [pos d_model]
        for rows in ds.iter_batches(256, shuffle=True):
            rows["blocks.2.hook_resid_post"], rows["tokens"]
    """
    args = {"hook_names": hook_names, "positions": positions, "dtype": dtype}
    return _run("activations", model, inputs, args, out_dir, batch_size, backend, num_workers, model_kwargs,
                progress, ray_address, tokenizer, shard_size, worker_threads, max_retries)


def map_prompts(model, inputs, fn: Callable, out_dir, batch_size: int = 8, backend: str = "local",
                num_workers: Optional[int] = None, model_kwargs: Optional[dict] = None, progress: bool = True,
                ray_address: Optional[str] = None, *, tokenizer=None, shard_size: Optional[int] = None,
                worker_threads: int = 1, max_retries: int = 2) -> ActivationDataset:
    """Run ``fn(model, batch) -> {name: per-prompt values}`` over a dataset, sharded and resumable like
    ``collect_activations`` (same ``model``, ``inputs``, backends, ``out_dir`` rules).

    ``batch`` is a ``workbench.experiments.Batch``: ``input_ids``, ``attention_mask``, ``position_ids`` [batch pos]
    (left-padded; pass all three to the model), ``prompt_indices`` and ``lengths`` [batch]. Each value is a
    tensor whose first axis is the batch, or a list with one tensor or number per prompt (shapes may differ
    between prompts). ``fn`` runs without ``torch.no_grad`` (attribution needs gradients; add it yourself when
    you do not). For Ray, ``fn`` must be picklable by cloudpickle (a lambda or a module-level function).
    Read results with ``ds[i][name]`` or ``ds.stack(name)``.

    Example::

        def next_token(model, b):
            with torch.no_grad():
                logits = model(b.input_ids, attention_mask=b.attention_mask, position_ids=b.position_ids)
            last = logits[:, -1].log_softmax(-1)                 # column -1 is every prompt's last token
            return {"top": last.argmax(-1), "logprob": last.amax(-1), "ids": [b.real(b.input_ids, i) for i in range(len(b))]}
        ds = map_prompts(model, prompts, next_token, "next/")
        ds.stack("top")                                          # [prompt]
    """
    return _run("map", model, inputs, {"fn": fn}, out_dir, batch_size, backend, num_workers, model_kwargs,
                progress, ray_address, tokenizer, shard_size, worker_threads, max_retries)
