"""Experiments over datasets of prompts: batched, resumable, on disk, and across workers with Ray.

* ``collect_activations(model, inputs, hook_names, out_dir, ...)`` records hooks over many prompts into sharded
  safetensors files plus ``manifest.json``; a second call with the same ``out_dir`` resumes.
* ``ActivationDataset(out_dir)`` reads them back memory-mapped: ``ds[i]``, ``ds.tokens(i)``, ``ds.iter_batches``.
* ``map_prompts(model, inputs, fn, out_dir, ...)`` runs any ``fn(model, batch) -> {name: per-prompt values}``
  the same way (a patching sweep, a metric, a logit-lens summary).
* ``backend="ray"`` spreads shards over Ray actors, one model per actor (GPU or CPU); see ``docs/experiments.md``.

Example::

    from workbench.experiments import collect_activations
    ds = collect_activations("command-r-tiny", ["The cat sat", "On the mat"], ["blocks.1.hook_resid_post"], "acts/")
    ds[0]["blocks.1.hook_resid_post"].shape     # [pos d_model]
"""

from .api import collect_activations, map_prompts
from .batching import Batch
from .dataset import ActivationDataset
from .store import ExperimentMismatchError

__all__ = ["ActivationDataset", "Batch", "ExperimentMismatchError", "collect_activations", "map_prompts"]
