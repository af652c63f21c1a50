"""safetensors files at the byte level: headers, reading one tensor (or some rows), aligned writing.

The loader reads checkpoints through these functions so that it never needs a whole shard in
memory, and disk offload writes its files with :func:`save_aligned`. Nothing here knows the model.

Example::

    entries = read_header("model.safetensors")           # name -> TensorEntry (file, dtype, shape, bytes)
    w = read_tensor(entries["model.norm.weight"], torch.float32)
    save_aligned("w", w, "/tmp/w.safetensors")           # data 64-byte aligned
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

import torch
from safetensors import safe_open

# float dtypes a checkpoint may hold, by safetensors' names
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# every dtype save_aligned writes
_WRITE_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                 torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as is; the message names the file and tensor."""


@dataclass
class TensorEntry:
    """Where one checkpoint tensor lives: shard file, HF name, dtype, shape and byte range."""

    file: str
    name: str
    dtype: torch.dtype
    shape: tuple
    start: int       # absolute byte offset of the data in ``file``
    nbytes: int


_ALL_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100_000_000     # safetensors' own limit


def read_header(file: str) -> dict[str, TensorEntry]:
    """Read and validate a shard's header (no tensor data is read), then confirm it with safetensors.

    Every inconsistency is a ``CheckpointError`` naming the file (and tensor): a header length past the
    end of the file, a header that is not a UTF-8 JSON object, unknown dtypes, shapes that disagree
    with the byte ranges, byte ranges that overlap, leave gaps or run past the end (truncation). A file
    that cannot be opened (permissions, a folder) is reported as such, not as corrupt.

    Example::

        read_header("model.safetensors")["model.norm.weight"].shape     # (d_model,)
    """
    try:
        with open(file, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            (n,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (None,)
            raw = fh.read(n) if n is not None and n <= min(size - 8, MAX_HEADER_BYTES) else None
    except PermissionError as e:
        raise CheckpointError(f"{file}: cannot be read: permission denied ({e.strerror}); the file itself may be "
                              "fine - check its permissions or owner") from None
    except OSError as e:
        raise CheckpointError(f"{file}: cannot be read ({e.strerror or e}); not a readable file") from None
    if n is None:
        raise CheckpointError(f"{file}: not a readable safetensors file: only {size} bytes, too short for a safetensors header; "
                              "it may be truncated or corrupt - download it again")
    if raw is None:
        raise CheckpointError(f"{file}: not a readable safetensors file: header length {n} does not fit in the file ({size} bytes) or exceeds "
                              f"{MAX_HEADER_BYTES} bytes; it may be truncated or corrupt - download it again")
    header = _parse_header(file, raw)
    entries = _entries(file, header, 8 + n, size)
    try:
        with safe_open(file, framework="pt") as f:
            names = set(f.keys())
    except Exception as e:  # SafetensorError: anything the checks above missed
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); "
                              "it may be truncated or corrupt - download it again") from None
    if names != set(entries):
        raise CheckpointError(f"{file}: safetensors lists other tensors than the header ({sorted(names ^ set(entries))})")
    for name, entry in entries.items():
        if entry.dtype is None:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {entry.shape_dtype}; "
                                  f"expected a float tensor ({', '.join(FLOAT_DTYPES)})")
    return {name: TensorEntry(e.file, e.name, e.dtype, e.shape, e.start, e.nbytes) for name, e in entries.items()}


def _parse_header(file: str, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{file}: not a readable safetensors file: header is not UTF-8 ({e}); "
                              "it may be truncated or corrupt - download it again") from None
    except (json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file: header is not valid JSON ({e}); "
                              "it may be truncated or corrupt - download it again") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: header is a JSON {type(header).__name__}, expected an object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{file}: header field '__metadata__' must map strings to strings, got {meta!r:.200}")
    return header


@dataclass
class _Checked:
    file: str
    name: str
    dtype: object
    shape: tuple
    start: int
    nbytes: int
    shape_dtype: str


def _entries(file: str, header: dict, data_start: int, size: int) -> dict:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    out, spans = {}, []
    for name, info in header.items():
        where = f"{file}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{where}: header entry must have dtype, shape and data_offsets, got {info!r:.200}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ALL_DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {dtype!r:.50} (expected one of {', '.join(_ALL_DTYPES)})")
        if not isinstance(shape, list) or not all(is_int(d) for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r:.200}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                                  f"got {offsets!r:.200}")
        numel = 1
        for d in shape:
            numel *= d
        if numel * _ALL_DTYPES[dtype] != offsets[1] - offsets[0]:
            raise CheckpointError(f"{where}: shape {shape} of {dtype} needs {numel * _ALL_DTYPES[dtype]} bytes but "
                                  f"data_offsets {offsets} span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
        out[name] = _Checked(file, name, FLOAT_DTYPES.get(dtype), tuple(shape), data_start + offsets[0],
                             offsets[1] - offsets[0], dtype)
    end = 0
    for b, e, name in sorted(spans):    # the data must be tiled exactly: no overlap (aliased weights), no gap
        if b != end:
            what = "overlaps the previous tensor's bytes" if b < end else f"leaves a gap of {b - end} bytes"
            raise CheckpointError(f"{file}: tensor {name!r} data_offsets start at {b}, which {what} (expected {end}); "
                                  "the header is inconsistent")
        end = e
    if data_start + end != size:
        state = "truncated" if data_start + end > size else "longer than its header says"
        raise CheckpointError(f"{file}: the header describes {data_start + end} bytes but the file has {size}: "
                              f"{state}; it may be truncated or corrupt - download it again")
    return out


def read_tensor(entry: TensorEntry, dtype=None, device="cpu") -> torch.Tensor:
    """Read one tensor into fresh memory (no mmap left behind), cast to ``dtype`` on ``device``.

    Example::

        w = read_tensor(entry, torch.bfloat16)
    """
    buf = torch.empty(entry.nbytes, dtype=torch.uint8)
    with open(entry.file, "rb") as fh:
        fh.seek(entry.start)
        got = fh.readinto(buf.numpy()) if entry.nbytes else 0
    if got != entry.nbytes:
        raise CheckpointError(f"{entry.file}: tensor {entry.name!r} is truncated ({got} of {entry.nbytes} bytes)")
    t = buf.view(entry.dtype).reshape(entry.shape)
    return t.to(device=device, dtype=dtype or entry.dtype)


def read_rows(entry: TensorEntry, r0: int, r1: int) -> torch.Tensor:
    """Rows [r0, r1) of a tensor (first axis), read from the file without touching the rest."""
    row = entry.nbytes // max(1, entry.shape[0]) if entry.shape else entry.nbytes
    part = TensorEntry(entry.file, entry.name, entry.dtype, (r1 - r0, *entry.shape[1:]), entry.start + r0 * row,
                       (r1 - r0) * row)
    return read_tensor(part)


def same_values(a: TensorEntry, b: TensorEntry, chunk_bytes: int = 1 << 26) -> bool:
    """Equal shapes and values, compared ~64 MB at a time (a 256k-vocab embedding is GBs)."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    if not a.shape:
        return torch.equal(read_tensor(a, torch.float32), read_tensor(b, torch.float32))
    rows = a.shape[0]
    step = max(1, chunk_bytes // max(1, a.nbytes // max(1, rows)))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        if not torch.equal(read_rows(a, r0, r1).float(), read_rows(b, r0, r1).float()):
            return False
    return True


def cast_tensor(entry: TensorEntry, dtype: torch.dtype, device) -> torch.Tensor:
    """Map one tensor, cast/move it, unmap: only this tensor's source pages are resident meanwhile."""
    with safe_open(entry.file, framework="pt") as f:
        return f.get_tensor(entry.name).to(device=device, dtype=dtype)


def save_aligned(name: str, tensor: torch.Tensor, file: str, align: int = 64) -> None:
    """Write one tensor as a safetensors file whose data starts ``align``-byte aligned.

    accelerate memory-maps offloaded weights straight from these files; a weight that is not
    64-byte aligned makes MKL take a different code path, and the offloaded model's matmuls then
    differ from the plain load's in the last bit. Padding the (JSON) header fixes the offset.

    Example::

        save_aligned("blocks.0.attn.o_proj.weight", w, "/scratch/offload/o_proj.safetensors")
    """
    tensor = tensor.detach().contiguous().cpu()
    entry = {"dtype": _WRITE_DTYPES[tensor.dtype], "shape": list(tensor.shape),
             "data_offsets": [0, tensor.numel() * tensor.element_size()]}
    header = json.dumps({"__metadata__": {"format": "pt"}, name: entry}, separators=(",", ":")).encode()
    header += b" " * ((-(8 + len(header))) % align)
    with open(file, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.write(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
