"""Checkpoint loading: HF tensor names <-> ours in one table, random init, checks, load (saving: saving.py).

Loading reads a Hugging Face checkpoint folder (``config.json``, ``generation_config.json``,
``model.safetensors`` or ``model.safetensors.index.json`` + shards) without needing twice the
memory: the model is built on the meta device and every tensor is taken straight from the files —
memory-mapped (no copy) when its dtype is already the target dtype and it stays on the CPU, read
into a buffer and cast one tensor at a time otherwise. Everything is validated *before* a single
weight is placed (missing/unexpected tensors, shapes, corrupt shards, a tied ``lm_head`` that
differs from the embedding ...), so a bad folder raises and nothing is half-loaded.

Example::

    model = HookedCommandR.from_pretrained("/ckpt/c4ai-command-r-v01", torch_dtype="auto",
                                           device_map="auto", offload_folder="/scratch/offload")
    model.save_pretrained("/tmp/copy", max_shard_size="2GB")      # workbench.saving
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch
from safetensors import safe_open
from torch import nn

from . import offload as off
from .bundled import BUNDLED_MODELS, resolve_model_path as resolve_bundled
from .checkpoint_shapes import check_sizes
from .config import CommandRConfig, parse_dtype
from .device_map_checks import disjoint_device_map
from .mapped_files import CheckpointChangedError, MappedFiles
from .quantization import QuantizationConfig, replace_linear_layers
from .safetensors_files import CheckpointError, TensorEntry, cast_tensor, read_header, read_tensor, same_values
from .weights import torch_device

__all__ = ["NAME_MAP", "CheckpointChangedError", "CheckpointError", "TensorEntry", "hf_to_ours", "ours_to_hf", "init_random", "read_tensor",
           "find_weight_files", "scan_checkpoint", "plan_sources", "resolve_dtype", "resolve_model_path",
           "read_generation_config", "load_pretrained", "parse_size"]

# HF name <-> our name, one row per tensor kind; "{i}" is the layer index. Used both ways.
NAME_MAP = [
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.ln1.weight"),
    ("model.layers.{i}.self_attn.q_proj.weight", "blocks.{i}.attn.q_proj.weight"),
    ("model.layers.{i}.self_attn.k_proj.weight", "blocks.{i}.attn.k_proj.weight"),
    ("model.layers.{i}.self_attn.v_proj.weight", "blocks.{i}.attn.v_proj.weight"),
    ("model.layers.{i}.self_attn.o_proj.weight", "blocks.{i}.attn.o_proj.weight"),
    ("model.layers.{i}.self_attn.q_norm.weight", "blocks.{i}.attn.q_norm.weight"),
    ("model.layers.{i}.self_attn.k_norm.weight", "blocks.{i}.attn.k_norm.weight"),
    ("model.layers.{i}.mlp.gate_proj.weight", "blocks.{i}.mlp.gate_proj.weight"),
    ("model.layers.{i}.mlp.up_proj.weight", "blocks.{i}.mlp.up_proj.weight"),
    ("model.layers.{i}.mlp.down_proj.weight", "blocks.{i}.mlp.down_proj.weight"),
    ("model.norm.weight", "ln_final.weight"),
    ("lm_head.weight", "unembed.weight"),
]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth",
                 "consolidated.00.pth", "tf_model.h5", "flax_model.msgpack")

def _pattern(template: str) -> re.Pattern:
    return re.compile("^" + re.escape(template).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_HF_TO_OURS = [(_pattern(hf), ours) for hf, ours in NAME_MAP]
_OURS_TO_HF = [(_pattern(ours), hf) for hf, ours in NAME_MAP]


def _rename(name: str, table) -> Optional[str]:
    for pat, template in table:
        m = pat.match(name)
        if m:
            return template.replace("{i}", m.groupdict().get("i") or "")
    return None


def hf_to_ours(name: str) -> Optional[str]:
    """``"model.layers.3.mlp.up_proj.weight"`` -> ``"blocks.3.mlp.up_proj.weight"`` (None if unknown)."""
    return _rename(name, _HF_TO_OURS)


def ours_to_hf(name: str) -> str:
    """``"blocks.3.mlp.up_proj.weight"`` -> ``"model.layers.3.mlp.up_proj.weight"`` (KeyError if unknown)."""
    hf = _rename(name, _OURS_TO_HF)
    if hf is None:
        raise KeyError(f"no Hugging Face name for parameter {name!r}")
    return hf


@torch.no_grad()
def init_random(model, dtype=None, seed: Optional[int] = None):
    """normal(0, 0.02) linear/embedding weights, ones for norms (like transformers' init)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if model.device.type != "meta":
        for name, p in model.named_parameters():
            if name.endswith("ln1.weight") or name.endswith("norm.weight") or name == "ln_final.weight":
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    if dtype is not None:
        model.to(parse_dtype(dtype))
    return model


# ---------------------------------------------------------------------------------------- reading
def find_weight_files(path: str) -> tuple[list[str], Optional[dict]]:
    """The shard files of a folder (and the index's weight_map, if sharded); refuses pickles."""
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):          # transformers prefers the single file when both are present
        return [single], None
    index_file = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index_file):
        try:
            with open(index_file, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: expected JSON with a 'weight_map' object ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) and v
                                                       and os.path.basename(v) == v for k, v in weight_map.items()):
            raise CheckpointError(f"{index_file}: weight_map must map tensor names to shard file names in this "
                                  f"folder, got {type(weight_map).__name__} {str(weight_map)[:200]}")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(path, s))]
        if missing:
            raise CheckpointError(f"{index_file} names shard(s) that are not in {path}: {missing}")
        return [os.path.join(path, s) for s in shards], weight_map
    single = os.path.join(path, SINGLE_FILE)
    if os.path.isfile(single):
        return [single], None
    present = sorted(os.listdir(path))
    pickles = [f for f in present if f in _PICKLE_FILES or f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickle-based weights {pickles}; refusing to unpickle them (pickle can run "
            "arbitrary code). Convert the checkpoint to safetensors (e.g. transformers' save_pretrained "
            "with safe_serialization=True in a sandbox) and load that folder.")
    shards = [f for f in present if f.endswith(".safetensors")]
    hint = f" (found {shards} but no {INDEX_FILE})" if shards else ""
    raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}{hint}; files there: {present}")


def scan_checkpoint(path: str) -> dict[str, TensorEntry]:
    """HF tensor name -> TensorEntry for every tensor of the checkpoint, cross-checked with the index."""
    files, weight_map = find_weight_files(path)
    entries: dict[str, TensorEntry] = {}
    for file in files:
        for name, entry in read_header(file).items():
            if name in entries:
                raise CheckpointError(f"tensor {name!r} is in two shards: {entries[name].file} and {file}")
            entries[name] = entry
    for name, shard in (weight_map or {}).items():
        if name not in entries or os.path.basename(entries[name].file) != shard:
            raise CheckpointError(f"{os.path.join(path, INDEX_FILE)} says {name!r} is in {shard}, "
                                  "but that shard does not contain it")
    return entries


def _listing(names, limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def plan_sources(cfg: CommandRConfig, expected: dict[str, tuple], entries: dict[str, TensorEntry],
                 path: str) -> dict[str, TensorEntry]:
    """Our parameter name -> its TensorEntry, after every check; raises before anything is loaded.

    ``expected`` is our state_dict name -> shape (``unembed.weight`` included even when tied).
    """
    sources: dict[str, TensorEntry] = {}
    unexpected, zero_biases = [], []
    for hf_name, entry in entries.items():
        ours = hf_to_ours(hf_name)
        if ours == "unembed.weight" and cfg.tie_word_embeddings:
            continue  # checked against the embedding below
        if ours is None or ours not in expected:
            if hf_name.endswith(".bias") and hf_to_ours(hf_name[:-5] + ".weight") is not None:
                zero_biases.append(entry)  # some exports carry all-zero biases: checked, then dropped
            else:
                unexpected.append(hf_name)
            continue
        sources[ours] = entry
    tied = cfg.tie_word_embeddings
    missing = [f"{ours_to_hf(n)} ({n})" for n in expected if n not in sources and not (tied and n == "unembed.weight")]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_listing(unexpected)}")
        raise CheckpointError(f"{path}: checkpoint does not match config.json "
                              f"(model_type {cfg.model_type!r}, {cfg.n_layers} layers, "
                              f"use_qk_norm={cfg.use_qk_norm}): " + "; ".join(parts))
    bad = [f"{e.name}: file {list(e.shape)} vs expected {list(expected[n])}"
           for n, e in sources.items() if tuple(e.shape) != tuple(expected[n])]
    if bad:
        raise CheckpointError(f"{path}: shape mismatch with config.json: " + "; ".join(bad))
    for entry in zero_biases:
        if bool(read_tensor(entry).any()):
            raise CheckpointError(f"{entry.file}: tensor {entry.name!r} is a non-zero bias; Command-R has no "
                                  "biases (attention_bias=false), so this checkpoint is not supported")
    if tied:
        lm = entries.get(ours_to_hf("unembed.weight"))
        if lm is not None:
            emb = sources["embed.weight"]
            if not same_values(lm, emb):
                raise CheckpointError(
                    f"{lm.file}: lm_head.weight differs from model.embed_tokens.weight but config.json has "
                    "tie_word_embeddings=true; set tie_word_embeddings to false to use the separate lm_head")
        sources["unembed.weight"] = sources["embed.weight"]
    return sources


# ---------------------------------------------------------------------------------------- loading
def resolve_dtype(cfg: CommandRConfig, torch_dtype=None, dtype=None, checkpoint_dtype=None) -> torch.dtype:
    """None -> float32 (as the Command-R docs describe); "auto" -> config.json's dtype; explicit wins."""
    if torch_dtype is not None and dtype is not None and parse_dtype_or_auto(torch_dtype) != parse_dtype_or_auto(dtype):
        raise ValueError(f"torch_dtype={torch_dtype!r} and dtype={dtype!r} disagree; pass one of them")
    want = torch_dtype if torch_dtype is not None else dtype
    if want is None:
        return torch.float32
    if want == "auto":   # config's dtype, else the weights' own (as transformers), else float32
        return cfg.torch_dtype or checkpoint_dtype or torch.float32
    return parse_dtype(want, "torch_dtype")


def parse_dtype_or_auto(value):
    return "auto" if value == "auto" else parse_dtype(value, "torch_dtype")


def resolve_model_path(path) -> str:
    path = os.fspath(path)
    if os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    if os.path.isfile(os.path.expanduser(path)):
        folder = os.path.dirname(os.path.expanduser(path)) or "."
        raise FileNotFoundError(f"{path} is a file; pass the checkpoint folder {folder}")
    try:
        return resolve_bundled(path)
    except KeyError:
        raise FileNotFoundError(f"checkpoint folder not found: {path} (and it is not a bundled model name; "
                                f"bundled: {sorted(BUNDLED_MODELS)})") from None


def read_generation_config(path: str) -> dict:
    file = os.path.join(path, "generation_config.json")
    if not os.path.isfile(file):
        return {}
    try:
        with open(file, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(d).__name__}")
    return d


@contextlib.contextmanager
def _skip_init():
    """No random init while building on meta: it is thrown away, and ``normal_`` on meta tensors goes
    through torch's Python decompositions, whose first use imports the compiler stack (~5 s)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "kaiming_normal_", "trunc_normal_",
             "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_")
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, fn in saved.items():
            setattr(nn.init, n, fn)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    module = model.get_submodule(mod_name)
    if isinstance(value, nn.Parameter):
        module._parameters[attr] = value
    else:
        module._parameters[attr] = nn.Parameter(value, requires_grad=value.is_floating_point())


def _place_tensors(model, expected, sources, device_map, target, quant, offload, progress, path,
                   mmap: bool = True) -> set:
    """Put every weight where ``device_map`` says: mmap (same dtype, CPU, ``mmap=True``), copy or cast
    (thread pool), quantized, or recorded for disk offload. Tied weights on one device share one
    Parameter. Returns the files whose memory maps the model keeps."""
    from tqdm.auto import tqdm   # optional display dependency, loaded only when loading

    bar = tqdm(total=len(expected), desc=f"Loading {os.path.basename(os.path.normpath(path))}",
               unit="tensor", disable=not progress, leave=False)
    handles: dict = {}                      # shard file -> safe_open handle (memory maps)
    first: dict[tuple, str] = {}            # (file, tensor, device) -> our first name loaded from it
    shared: list[tuple[str, str]] = []      # (name, name it shares a Parameter with)
    casts = []
    # casting reads the source through short-lived memory maps, a few tensors at once: torch's
    # copy kernels release the GIL, and each source's pages leave memory with its map
    pool = ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1)))
    try:
        for name in expected:
            entry, dev = sources[name], off.device_for(device_map, name)
            if dev == "disk":
                offload.add(name, entry)
                bar.update(1)
                continue
            device = torch_device(dev)
            key = (entry.file, entry.name, str(device))
            if key in first:                                    # tied embedding / unembedding
                shared.append((name, first[key]))
                continue
            first[key] = name
            if quant is not None and quant.should_quantize(name):
                module = model.get_submodule(name.rpartition(".")[0])
                _set_tensor(model, name, quant.quantize(read_tensor(entry, target), dev, module))
            elif mmap and entry.dtype == target and device.type == "cpu":
                if entry.file not in handles:
                    handles[entry.file] = safe_open(entry.file, framework="pt")
                _set_tensor(model, name, handles[entry.file].get_tensor(entry.name))  # mmap, no copy
            elif entry.dtype == target and device.type == "cpu":     # mmap=False: a copy in memory
                casts.append((name, pool.submit(read_tensor, entry, target, device)))
            else:
                casts.append((name, pool.submit(cast_tensor, entry, target, device)))
                continue
            bar.update(1)
        for name, future in casts:
            _set_tensor(model, name, future.result())
            bar.update(1)
        for name, other in shared:
            _set_tensor(model, name, model.get_parameter(other))
            bar.update(1)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    mapped = set(handles)
    handles.clear()
    return mapped


def load_pretrained(cls, path, torch_dtype=None, dtype=None, device=None, device_map=None, max_memory=None,
                    offload_folder=None, offload_buffers=False, quantization_config=None, progress=True,
                    mmap: bool = True):
    """Load a Hugging Face checkpoint folder (or a bundled model name) into ``cls`` (HookedCommandR).

    ``torch_dtype``/``dtype``: None -> float32, ``"auto"`` -> config.json's, or explicit. ``device``: one
    device; or ``device_map`` ("auto", "balanced", "balanced_low_0", "sequential" or {module: device})
    with ``max_memory`` ({0: "20GiB", "cpu": "60GiB"}) and ``offload_folder`` for "disk" entries (without
    it, disk-offloaded weights are read from the checkpoint's own shards). ``quantization_config``: a
    ``workbench.QuantizationConfig``, a dict or transformers' ``BitsAndBytesConfig``.

    ``mmap``: True (default) takes CPU weights already in the target dtype straight from the files'
    memory maps (no copy, no extra memory); the files must then stay as they are while the model
    lives. Every forward first checks their size/mtime/inode (and those of disk-offloaded weights;
    ``workbench.mapped_files``) and raises ``CheckpointChangedError`` if one changed, instead of
    crashing on a truncated map (SIGBUS) or computing with rewritten weights; reading weights outside
    a forward (``model.W_Q``) is not checked. ``mmap=False`` copies them into memory instead.

    Example::

        model = HookedCommandR.from_pretrained(path, torch_dtype=torch.bfloat16, device_map="auto")
    """
    path = resolve_model_path(path)
    cfg = CommandRConfig.from_pretrained(path)
    if device is not None and device_map is not None:
        raise ValueError("pass either device or device_map, not both")
    generation_config = read_generation_config(path)
    entries = scan_checkpoint(path)
    check_sizes(cfg, entries, path)      # config sizes vs the tensor headers, before building anything
    embed = entries.get("model.embed_tokens.weight")
    target = resolve_dtype(cfg, torch_dtype, dtype, getattr(embed, "dtype", None))
    with torch.device("meta"), _skip_init():
        model = cls(cfg).to(target)      # placeholders in the target dtype (accelerate casts to them)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sources = plan_sources(cfg, expected, entries, path)

    quant = None
    if quantization_config is not None:
        quant = QuantizationConfig.coerce(quantization_config)
    if quant is not None and quant.enabled:
        replace_linear_layers(model, quant, target)
    else:
        quant = None
    device_map = disjoint_device_map(device_map, model)  # overlapping keys would fail inside accelerate
    device_map = off.resolve_device_map(model, device_map, max_memory, target, device)
    if quant is not None and "disk" in device_map.values():
        raise ValueError("device_map: a quantized model cannot be offloaded to disk; give it more max_memory")
    offload = off.Offloader(path, offload_folder, target) if "disk" in device_map.values() else None

    mapped = _place_tensors(model, expected, sources, device_map, target, quant, offload, progress, path, mmap)
    by_path = set()
    if offload is not None:
        offload.finish()
        by_path = {info["safetensors_file"] for info in offload.index.values()}
    if cfg.tie_word_embeddings and model.unembed.weight.device == model.embed.weight.device:
        model.unembed.weight = model.embed.weight
    off.dispatch(model, device_map, offload, offload_buffers)
    model.generation_config = generation_config
    model.name_or_path = path
    model.mapped_files = MappedFiles(mapped, by_path) if mapped or by_path else None   # checked before every forward
    model.cfg.device, model.cfg.dtype = model.device, target     # tlsurface: TL's cfg.device / cfg.dtype
    return model.eval()


# ---------------------------------------------------------------------------------------- sizes
def parse_size(size) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"2GiB"`` -> 2 * 2**30, ``1000`` -> 1000 (transformers' units)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size: cannot parse {size!r}; expected an int or e.g. '5GB', '500MB', '2GiB'")
    unit = (m.group(2) or "B").upper()
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)
