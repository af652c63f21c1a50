"""The on-disk layout of an experiment: ``manifest.json`` plus one safetensors file per shard.

``out_dir/manifest.json`` says what was computed (model config and weights fingerprints, hook names or the
function, positions, dtype, a fingerprint of the prompts) and where every prompt lives (shard, index in the
shard, first row and row count). It is written before the first shard, so a second call can refuse another
model, hook set or prompt list before computing anything, and rewritten with ``"complete": true`` at the end.

A shard is written to a hidden temporary name and renamed into place once complete (``os.replace`` is
atomic), so a killed run leaves either a whole shard or none; a finished shard is one whose file exists and
whose header carries this run's ``run_id``. Tensors in a shard file:

* ``__prompt_ids__`` [n] the prompts' dataset indices; ``__tokens__`` + ``__token_offsets__`` [n+1] their ids;
* activations: ``<hook name>`` [rows ...] the stored positions of every prompt, one after another;
  ``__row_offsets__`` [n+1] and ``__positions__`` [rows] (position of each row within its prompt);
* ``map_prompts`` results: ``<name>`` flattened per-prompt values with ``<name>::offsets`` [n+1] and
  ``<name>::shapes`` [n ndim] (values may differ in shape from prompt to prompt).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "workbench.experiments"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_GLOB_PREFIX = "shard-"

# Manifest fields that must agree for a second call to resume the first one's run.
IDENTITY = ("kind", "model.config_fingerprint", "model.weights_fingerprint", "hook_names", "fn", "positions",
            "dtype", "inputs_fingerprint")


class ExperimentMismatchError(ValueError):
    """``out_dir`` holds results of another model, hook set or prompt list (or is not an experiment)."""


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def run_id(identity: dict) -> str:
    """A short id of everything that decides the results; every shard file carries it."""
    text = json.dumps({k: _get(identity, k) for k in IDENTITY}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def build_manifest(identity: dict, plans, tokens: list, rows: Optional[list], shard_size: int) -> dict:
    """The manifest of a fresh run: ``identity`` fields plus the shard and prompt tables."""
    prompts: list = [None] * len(tokens)
    shards = []
    for plan in plans:
        row = 0
        for j, p in enumerate(plan.prompt_ids):
            entry = {"shard": plan.index, "index": j, "length": len(tokens[p])}
            if rows is not None:
                entry.update(row=row, rows=len(rows[p]))
                row += len(rows[p])
            prompts[p] = entry
        shards.append({"file": plan.file, "prompts": list(plan.prompt_ids), "rows": row})
    manifest = {"format": FORMAT, "version": VERSION, **identity, "run_id": run_id(identity),
                "n_prompts": len(tokens), "n_tokens": sum(map(len, tokens)), "shard_size": shard_size,
                "n_rows": sum(map(len, rows)) if rows is not None else None,
                "shards": shards, "prompts": prompts, "tensors": {}, "complete": False}
    return manifest


def read_manifest(out_dir: str) -> Optional[dict]:
    """The manifest in ``out_dir``, or None if there is none; a foreign or broken one is refused."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        if os.path.isdir(out_dir) and any(n.startswith(SHARD_GLOB_PREFIX) for n in os.listdir(out_dir)):
            raise ExperimentMismatchError(f"out_dir {out_dir} holds shard files but no {MANIFEST}; "
                                          "use an empty folder or delete the stray shards")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ExperimentMismatchError(f"{path}: unreadable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExperimentMismatchError(f"{path} is not a workbench experiment manifest")
    if manifest.get("version") != VERSION:
        raise ExperimentMismatchError(f"{path}: manifest version {manifest.get('version')!r}, this workbench "
                                      f"reads version {VERSION}")
    return manifest


def check_same_run(manifest: dict, identity: dict, out_dir: str) -> None:
    """Refuse to resume a run of another model, weights, hook set, positions, dtype or prompt list."""
    what = {"kind": "kind of run", "model.config_fingerprint": "model config",
            "model.weights_fingerprint": "model weights", "hook_names": "hook names", "fn": "function",
            "positions": "positions", "dtype": "dtype", "inputs_fingerprint": "prompts"}
    for key in IDENTITY:
        old, new = _get(manifest, key), _get(identity, key)
        if old != new:
            if key.endswith("fingerprint"):
                old, new = f"{str(old)[:12]}…", f"{str(new)[:12]}…"
            raise ExperimentMismatchError(
                f"out_dir {out_dir} holds a run with different {what[key]} ({key}: {old!r} there, {new!r} now; "
                f"model there: {_get(manifest, 'model.name')!r}). Use another out_dir, or delete this one to "
                "start over.")


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(out_dir: str, manifest: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, MANIFEST), manifest)


# ---------------------------------------------------------------------------------------- shards
def shard_done(out_dir: str, file: str, rid: str) -> bool:
    """Whether ``file`` is a complete shard of run ``rid`` (a temporary or foreign file never counts)."""
    path = os.path.join(out_dir, file)
    if not os.path.exists(path):
        return False
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("run_id") == rid
    except Exception:           # a truncated file from outside this module: recompute it
        return False


def write_shard(out_dir: str, file: str, tensors: dict, rid: str) -> str:
    """Write ``tensors`` under a temporary name, fsync, then rename to ``file``; returns the final path."""
    path = os.path.join(out_dir, file)
    tmp = os.path.join(out_dir, f".{file}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"run_id": rid, "file": file})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def remove_stale_temporaries(out_dir: str) -> None:
    """Delete ``.shard-*.tmp-*`` files left by killed runs (only call when no other run uses out_dir)."""
    for name in os.listdir(out_dir):
        if name.startswith("." + SHARD_GLOB_PREFIX) and ".tmp-" in name:
            try:
                os.remove(os.path.join(out_dir, name))
            except OSError:
                pass


def tensor_table(out_dir: str, file: str) -> dict:
    """{name: {"dtype", "shape"}} of the result tensors in one shard (row/trailing shape, no bookkeeping)."""
    out = {}
    with safe_open(os.path.join(out_dir, file), framework="pt") as f:
        for name in f.keys():
            if name.startswith("__") or "::" in name:
                continue
            sl = f.get_slice(name)
            dtype = str(sl[:1].dtype).replace("torch.", "")       # one row read: torch's dtype name
            out[name] = {"dtype": dtype, "shape": list(sl.get_shape())[1:]}
    return out


# ---------------------------------------------------------------------------------------- packing
def _offsets(lengths) -> torch.Tensor:
    return torch.tensor([0] + list(lengths), dtype=torch.int64).cumsum(0)


def pack_common(tokens: list, prompt_ids: list) -> dict:
    seqs = [tokens[p] for p in prompt_ids]
    return {"__prompt_ids__": torch.tensor(prompt_ids, dtype=torch.int64),
            "__tokens__": torch.tensor([t for s in seqs for t in s], dtype=torch.int64),
            "__token_offsets__": _offsets(len(s) for s in seqs)}


def pack_rows(values: dict, positions: list) -> dict:
    """Activations: per hook a list (one per prompt) of [rows ...] tensors -> concatenated rows + offsets."""
    out = {name: torch.cat(chunks, dim=0) for name, chunks in values.items()}
    out["__row_offsets__"] = _offsets(len(p) for p in positions)
    out["__positions__"] = torch.tensor([q for p in positions for q in p], dtype=torch.int64)
    return out


def pack_flat(values: dict) -> dict:
    """map_prompts: per name a list of per-prompt tensors (any shape, same ndim) -> flat + offsets + shapes."""
    out = {}
    for name, items in values.items():
        ndims = {t.dim() for t in items}
        if len(ndims) != 1:
            raise ValueError(f"map_prompts: values of {name!r} differ in their number of dimensions "
                             f"({sorted(ndims)}) from prompt to prompt")
        ndim = ndims.pop()
        out[name] = torch.cat([t.reshape(-1) for t in items])
        out[f"{name}::offsets"] = _offsets(t.numel() for t in items)
        out[f"{name}::shapes"] = torch.tensor([list(t.shape) for t in items], dtype=torch.int64).reshape(len(items), ndim)
    return out
