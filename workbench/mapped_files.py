"""Weight files a loaded model keeps reading while it runs, checked before every forward.

A model loaded with ``mmap=True`` (the default) takes CPU tensors of the checkpoint's own dtype straight
from the file's memory map (no copy), and disk-offloaded weights are read from their files at every
forward. If such a file is truncated after loading, the next read of a missing page kills the process
with SIGBUS (a dead Jupyter kernel); if it is overwritten (a new download, ``save_pretrained`` to the
same folder), the weights change silently. ``MappedFiles`` records each file's size, mtime and inode at
load time (memory-mapped files are held open and checked with ``fstat``: a new file renamed over the
path leaves the maps intact and is not an error); the model's ``__call__`` runs ``check()`` first (one
``stat`` per file, a few microseconds) and raises ``CheckpointChangedError`` naming the file instead.

The check cannot help when a file changes *during* a forward, nor when weights are read outside a
forward (``model.W_Q``, ``state_dict()``); load with ``mmap=False`` to copy the weights into memory and
be independent of the files.

Example::

    files = MappedFiles(mapped=["/ckpt/model.safetensors"])
    files.check()          # CheckpointChangedError once the file is truncated, replaced or rewritten
"""

from __future__ import annotations

import os
from typing import Iterable


class CheckpointChangedError(RuntimeError):
    """A weight file the model reads from (memory map or disk offload) changed after loading."""


def _stat(path: str) -> tuple:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


def _fstat(handle) -> tuple:
    st = os.fstat(handle.fileno())
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev


class MappedFiles:
    """The files a model reads weights from, with their size, mtime and inode at load time.

    ``mapped``: files whose memory maps the model's tensors live in. They are held open and checked
    with ``fstat``: replacing the path (``save_pretrained`` writes a new file and renames it over the
    old one) is harmless, since the maps keep the old file; truncating or rewriting that file is not.
    ``by_path``: files read again by path at every forward (accelerate's disk offload); a new file at
    the path counts as a change.
    """

    def __init__(self, mapped: Iterable[str] = (), by_path: Iterable[str] = ()) -> None:
        self.handles = {os.path.abspath(f): open(f, "rb", buffering=0) for f in sorted(set(mapped))}
        self.stats = {p: _fstat(h) for p, h in self.handles.items()}
        self.paths = {os.path.abspath(f): _stat(f) for f in sorted(set(by_path))}

    def __len__(self) -> int:
        return len(self.stats) + len(self.paths)

    def __repr__(self) -> str:
        return f"MappedFiles({len(self.stats)} mapped, {len(self.paths)} read by path)"

    def __deepcopy__(self, memo) -> "MappedFiles":
        return self          # a copied model still reads the same files

    def check(self) -> None:
        """Raise ``CheckpointChangedError`` if a recorded file is gone or changed (size, mtime, inode)."""
        for path, handle in self.handles.items():
            self._compare(path, self.stats[path], handle)
        for path, before in self.paths.items():
            self._compare(path, before, None)

    def _compare(self, path: str, before: tuple, handle) -> None:
        try:
            now = _fstat(handle) if handle is not None else _stat(path)
        except OSError as e:
            raise CheckpointChangedError(self._message(path, f"it can no longer be read ({e.strerror})")) from None
        if now != before:
            what = (f"its size changed from {before[0]} to {now[0]} bytes (truncated or rewritten)"
                    if now[0] != before[0] else "it was rewritten or replaced (mtime/inode changed)")
            raise CheckpointChangedError(self._message(path, what))

    @staticmethod
    def _message(path: str, what: str) -> str:
        return (f"{path}: this model reads weights from the file (memory map or disk offload), and {what} "
                "after loading. Its weights are no longer the loaded ones (a truncated map would crash the "
                "process), so the forward is refused. Load the model again, and load with mmap=False to keep "
                "the weights in memory, independent of the files")
