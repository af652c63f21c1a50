"""Weight files a loaded model keeps reading while it runs, checked before every forward.

A model loaded with ``mmap=True`` (the default) takes CPU tensors of the checkpoint's own dtype straight
from the file's memory map (no copy), and disk-offloaded weights are read from their files at every
forward. If such a file is truncated after loading, the next read of a missing page kills the process
with SIGBUS (a dead Jupyter kernel); if it is overwritten (a new download, ``save_pretrained`` to the
same folder), the weights change silently. ``MappedFiles`` records each file's size, mtime and inode at
load time; the model's ``__call__`` runs ``check()`` first (one ``os.stat`` per file, a few microseconds)
and raises ``CheckpointChangedError`` naming the file instead.

The check cannot help when a file changes *during* a forward, nor when weights are read outside a
forward (``model.W_Q``, ``state_dict()``); load with ``mmap=False`` to copy the weights into memory and
be independent of the files.

Example::

    files = MappedFiles(["/ckpt/model.safetensors"])
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


class MappedFiles:
    """Size, mtime and inode of each file a model reads weights from, recorded when it is created."""

    def __init__(self, files: Iterable[str]) -> None:
        self.stats = {os.path.abspath(f): _stat(f) for f in sorted(set(files))}

    def __len__(self) -> int:
        return len(self.stats)

    def __repr__(self) -> str:
        return f"MappedFiles({len(self)} files)"

    def check(self) -> None:
        """Raise ``CheckpointChangedError`` if a recorded file is gone or changed (size, mtime, inode)."""
        for path, before in self.stats.items():
            try:
                now = _stat(path)
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
