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


def read_header(file: str) -> dict[str, TensorEntry]:
    """Validate a shard with safetensors itself, then read its header for byte offsets.

    Example::

        read_header("model.safetensors")["model.norm.weight"].shape     # (d_model,)
    """
    try:
        with safe_open(file, framework="pt") as f:
            names = set(f.keys())
    except Exception as e:  # SafetensorError: truncated, corrupt, not safetensors
        raise CheckpointError(f"{file}: not a readable safetensors file ({e}); "
                              "it may be truncated or corrupt - download it again") from None
    with open(file, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    entries = {}
    for name in names:
        info = header[name]
        if info["dtype"] not in FLOAT_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r} has dtype {info['dtype']}; "
                                  f"expected a float tensor ({', '.join(FLOAT_DTYPES)})")
        b, e = info["data_offsets"]
        entries[name] = TensorEntry(file, name, FLOAT_DTYPES[info["dtype"]], tuple(info["shape"]), 8 + n + b, e - b)
    return entries


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
