"""Computing shards: what one shard's work is (a task), and the in-process loop over the missing shards.

A task turns one ``Batch`` into per-prompt values. ``ActivationTask`` records hook tensors ([batch pos ...])
and keeps each prompt's selected real positions; ``MapTask`` calls the user's ``fn(model, batch)``. Both are
plain picklable objects, so the Ray backend ships the same task to its actors and every backend writes
identical shards through ``run_shard``.
"""

from __future__ import annotations

import numbers
import time
from typing import Callable, Optional, Sequence

import torch

from ..hook_points import StopForward
from .batching import Batch, ShardPlan, make_batches
from .store import pack_common, pack_flat, pack_rows, write_shard


class ActivationTask:
    """Record ``hook_names`` (all [batch pos ...]) at the selected positions, cast to ``dtype`` if given.

    The forward stops right after the last requested hook (no unembedding unless the logits are asked for).
    """

    kind = "activations"

    def __init__(self, hook_names: Sequence[str], positions: list, dtype: Optional[torch.dtype] = None) -> None:
        self.hook_names = list(hook_names)
        self.positions = positions            # per dataset prompt: sorted positions to keep
        self.dtype = dtype

    def last_hook(self, model) -> str:
        order = list(model.hook_dict)
        return max(self.hook_names, key=order.index)

    def __call__(self, model, batch: Batch) -> dict:
        store: dict = {}
        last = self.last_hook(model)

        def save(x: torch.Tensor, hook) -> None:
            store[hook.name] = x.detach()
            if hook.name == last:
                raise StopForward

        with torch.no_grad():
            model.run_with_hooks(batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=batch.position_ids, fwd_hooks=[(n, save) for n in self.hook_names])
        out: dict = {}
        for name in self.hook_names:
            x = store[name]
            if x.dim() < 2 or x.shape[:2] != batch.input_ids.shape:
                raise ValueError(f"hook {name!r}: expected a [batch pos ...] tensor, got shape {tuple(x.shape)}")
            x = x.to("cpu", self.dtype) if self.dtype is not None else x.to("cpu")    # one copy per batch
            out[name] = [x[b].index_select(0, self._index(batch, b, p))
                         for b, p in enumerate(batch.prompt_indices.tolist())]
        return out

    def _index(self, batch: Batch, b: int, p: int) -> torch.Tensor:
        """Columns of prompt ``p`` (row ``b``) to keep: its selected positions after the left padding."""
        start = batch.input_ids.shape[1] - int(batch.lengths[b])
        return torch.tensor(self.positions[p], dtype=torch.long) + start


class MapTask:
    """``fn(model, batch) -> {name: value}`` where a value is a tensor whose first axis is the batch, or a
    sequence with one tensor or number per prompt (values of one name may differ in shape between prompts)."""

    kind = "map"

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, model, batch: Batch) -> dict:
        result = self.fn(model, batch)
        if not isinstance(result, dict) or not result:
            raise TypeError(f"map_prompts: fn must return a non-empty dict {{name: per-prompt values}}, got "
                            f"{type(result).__name__}")
        n = len(batch)
        out = {}
        for name, value in result.items():
            if not isinstance(name, str) or name.startswith("__") or "::" in name:
                raise ValueError(f"map_prompts: result names must be strings without '::' or a leading '__', "
                                 f"got {name!r}")
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == n:
                items = list(value.detach().to("cpu").unbind(0))
            elif isinstance(value, (list, tuple)) and len(value) == n:
                items = [_as_tensor(v, name) for v in value]
            else:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(f"map_prompts: fn's {name!r} must hold one value per prompt ({n} in this batch): "
                                 f"a tensor [batch ...] or a list of {n}; got {shape}")
            out[name] = items
        return out


def _as_tensor(v, name: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().to("cpu")
    if isinstance(v, numbers.Number):
        return torch.tensor(v)
    raise TypeError(f"map_prompts: {name!r} holds a {type(v).__name__}; expected tensors or numbers")


def run_shard(model, task, plan: ShardPlan, tokens: list, batch_size: int, pad_id: int, out_dir: str, rid: str,
              on_batch: Optional[Callable[[int], None]] = None) -> dict:
    """Compute one shard batch by batch and write it atomically; returns {"shard", "prompts", "seconds"}."""
    start = time.perf_counter()
    values: dict = {}
    device = model.device
    for batch in make_batches(tokens, plan.prompt_ids, batch_size, pad_id, device):
        for name, items in task(model, batch).items():
            values.setdefault(name, []).extend(items)
        if on_batch is not None:
            on_batch(len(batch))
    tensors = pack_common(tokens, plan.prompt_ids)
    if task.kind == "activations":
        tensors.update(pack_rows(values, [task.positions[p] for p in plan.prompt_ids]))
    else:
        tensors.update(pack_flat(values))
    write_shard(out_dir, plan.file, tensors, rid)
    return {"shard": plan.index, "prompts": len(plan.prompt_ids), "seconds": time.perf_counter() - start}


def run_local(model, task, todo: list, tokens: list, batch_size: int, pad_id: int, out_dir: str, rid: str,
              bar=None) -> list:
    """Compute the ``todo`` shards one after another in this process; returns their reports."""
    reports = []
    for plan in todo:
        reports.append(run_shard(model, task, plan, tokens, batch_size, pad_id, out_dir, rid,
                                 on_batch=bar.update if bar is not None else None))
    return reports
