"""``ActivationDataset``: read an experiment's ``out_dir`` without loading it into memory.

Shard files are opened with ``safetensors.safe_open`` (memory-mapped) and only the rows asked for are read:
``ds[i]`` reads prompt i's rows, ``iter_batches`` reads at most two shards at a time. A few shard handles are
kept open (least recently used first out).

Example::

    ds = ActivationDataset("acts/")
    len(ds), ds.hook_names                     # prompts, recorded hooks
    ds[3]["blocks.2.hook_resid_post"]          # [pos d_model] prompt 3's stored positions
    ds.tokens(3), ds.positions(3)              # its token ids, and which positions were stored
    for rows in ds.iter_batches(512, shuffle=True, seed=0):
        x, y = rows["blocks.2.hook_resid_post"], rows["tokens"]      # [512 d_model], [512]
"""

from __future__ import annotations

import collections
import os
from typing import Iterator, Optional, Sequence

import torch
from safetensors import safe_open

from .store import read_manifest, shard_done

OPEN_HANDLES = 4
SHUFFLE_SHARDS = 2       # shards mixed together when shuffling (RAM holds this many shards of the chosen hooks)


class ActivationDataset:
    """Prompts and their recorded tensors from ``collect_activations`` or ``map_prompts``.

    ``ds[i]`` -> ``{name: Tensor}`` (activations: [pos ...] at the stored positions; map results: the value
    ``fn`` returned for prompt i); ``ds.tokens(i)`` its token ids; ``ds.positions(i)`` the stored positions;
    ``ds.iter_batches(...)`` flattened rows (one per stored token) for probes and SAEs; ``ds.stack(name)`` one
    map result for every prompt. ``ds.manifest`` is the parsed ``manifest.json``.
    """

    def __init__(self, out_dir) -> None:
        self.out_dir = os.fspath(out_dir)
        manifest = read_manifest(self.out_dir)
        if manifest is None:
            raise FileNotFoundError(f"{self.out_dir}: no manifest.json (not an experiment output folder)")
        if not manifest.get("complete"):
            missing = [s["file"] for s in manifest["shards"] if not shard_done(self.out_dir, s["file"], manifest["run_id"])]
            if missing:
                raise ValueError(f"{self.out_dir}: the run is incomplete, {len(missing)} of {len(manifest['shards'])} "
                                 f"shards missing (e.g. {missing[0]}); call the same collect_activations/map_prompts "
                                 "again to finish it")
        self.manifest = manifest
        self.kind = manifest["kind"]
        self.names = list(manifest["tensors"])
        self.last_run: Optional[dict] = None
        self._handles: collections.OrderedDict = collections.OrderedDict()

    # ------------------------------------------------------------------ basics
    @property
    def hook_names(self) -> list:
        return list(self.manifest["hook_names"] or [])

    @property
    def n_rows(self) -> Optional[int]:
        """Stored token rows over all prompts (activations)."""
        return self.manifest.get("n_rows")

    def __len__(self) -> int:
        return self.manifest["n_prompts"]

    def __repr__(self) -> str:
        what = f"hooks={self.hook_names}" if self.kind == "activations" else f"names={self.names}"
        return f"ActivationDataset({self.out_dir!r}, prompts={len(self)}, {what})"

    def _shard(self, s: int):
        if s in self._handles:
            self._handles.move_to_end(s)
            return self._handles[s]
        handle = safe_open(os.path.join(self.out_dir, self.manifest["shards"][s]["file"]), framework="pt")
        self._handles[s] = handle
        if len(self._handles) > OPEN_HANDLES:
            self._handles.popitem(last=False)
        return handle

    def _entry(self, i: int) -> dict:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"prompt index must be an int, got {type(i).__name__}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"prompt {i} out of range for {n} prompts")
        return self.manifest["prompts"][i % n]

    def _range(self, f, name: str, j: int) -> tuple:
        off = f.get_slice(name)[j:j + 2]
        return int(off[0]), int(off[1])

    def tokens(self, i: int) -> torch.Tensor:
        """Prompt ``i``'s token ids [pos] (int64)."""
        e = self._entry(i)
        f = self._shard(e["shard"])
        a, b = self._range(f, "__token_offsets__", e["index"])
        return f.get_slice("__tokens__")[a:b]

    def positions(self, i: int) -> torch.Tensor:
        """Which positions of prompt ``i`` were stored (activations), as int64 [rows]."""
        e = self._entry(i)
        if self.kind != "activations":
            raise ValueError("positions() is for activation datasets; map results are per prompt")
        return self._shard(e["shard"]).get_slice("__positions__")[e["row"]:e["row"] + e["rows"]]

    def __getitem__(self, i: int) -> dict:
        e = self._entry(i)
        f = self._shard(e["shard"])
        if self.kind == "activations":
            return {n: f.get_slice(n)[e["row"]:e["row"] + e["rows"]] for n in self.names}
        out = {}
        for n in self.names:
            a, b = self._range(f, f"{n}::offsets", e["index"])
            shape = f.get_slice(f"{n}::shapes")[e["index"]:e["index"] + 1][0].tolist()
            out[n] = f.get_slice(n)[a:b].reshape(shape)
        return out

    def stack(self, name: str) -> torch.Tensor:
        """One map result for every prompt, in prompt order: [prompt ...] (values must share a shape)."""
        if name not in self.names:
            raise KeyError(f"{name!r} is not in this dataset; it holds {self.names}")
        values = [self[i][name] for i in range(len(self))]
        shapes = {tuple(v.shape) for v in values}
        if len(shapes) != 1:
            raise ValueError(f"{name!r} has different shapes across prompts ({sorted(shapes)[:3]}…); read ds[i] instead")
        return torch.stack(values)

    # ------------------------------------------------------------------ flattened rows
    def _shard_rows(self, s: int, names: Sequence[str]) -> dict:
        """Every row of shard ``s``: the chosen tensors plus "tokens", "prompt" and "position" [rows]."""
        f = self._shard(s)
        out = {n: f.get_tensor(n) for n in names}
        row_off = f.get_tensor("__row_offsets__")
        tok_off = f.get_tensor("__token_offsets__")
        counts = row_off[1:] - row_off[:-1]
        position = f.get_tensor("__positions__")
        prompt_in_shard = torch.repeat_interleave(torch.arange(len(counts)), counts)
        out["prompt"] = f.get_tensor("__prompt_ids__")[prompt_in_shard]
        out["position"] = position
        out["tokens"] = f.get_tensor("__tokens__")[tok_off[prompt_in_shard] + position]
        return out

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, names: Optional[Sequence[str]] = None,
                     drop_last: bool = False) -> Iterator[dict]:
        """Batches of flattened token rows: ``{hook: [rows ...], "tokens": [rows], "prompt": [rows],
        "position": [rows]}`` with ``rows = batch_size`` (the last one shorter unless ``drop_last``).

        ``shuffle`` visits shards in a random order and shuffles the rows of two shards at a time (memory
        stays at two shards of the chosen ``names``, never the dataset); ``seed`` makes it repeatable.
        """
        if self.kind != "activations":
            raise ValueError("iter_batches() reads activation datasets; for map results use ds[i] or ds.stack(name)")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        names = list(self.names if names is None else names)
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise KeyError(f"{unknown} not in this dataset; it holds {self.names}")
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.manifest["shards"]), generator=g).tolist() if shuffle \
            else list(range(len(self.manifest["shards"])))
        window = SHUFFLE_SHARDS if shuffle else 1
        carry: Optional[dict] = None
        for w in range(0, len(order), window):
            parts = [self._shard_rows(s, names) for s in order[w:w + window]]
            pool = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            if shuffle:
                perm = torch.randperm(len(pool["tokens"]), generator=g)
                pool = {k: v[perm] for k, v in pool.items()}
            if carry is not None:
                pool = {k: torch.cat([carry[k], pool[k]]) for k in pool}
            n = len(pool["tokens"])
            full = n - n % batch_size
            for a in range(0, full, batch_size):
                yield {k: v[a:a + batch_size] for k, v in pool.items()}
            carry = {k: v[full:] for k, v in pool.items()} if full < n else None
        if carry is not None and not drop_last:
            yield carry
