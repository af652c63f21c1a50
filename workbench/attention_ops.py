"""Attention building blocks shared by the model and the long-context analyses.

* ``mask_rows``: the additive mask for any set of query rows (the model's ``Masks`` builds its
  dense masks with it, so a row subset is exactly the same rows of the full mask).
* ``pattern_rows``: scores -> softmax -> pattern with exactly the explicit path's op sequence,
  computed in query blocks into one output buffer, so a ``[batch head q_pos k_pos]`` pattern costs
  about its own bytes instead of ~3x (fp32 scores, masked scores, fp32 softmax).
* ``observe_attention``: a per-call observer that sees every layer's attention inputs (rotated q,
  keys after the KV cache, the forward's masks) without hooking the pattern, so analyses can compute
  selected rows while every layer runs the fused path.

Bit-exactness of the blocks (measured on an AMD EPYC host, torch 2.13 CPU with MKL/oneDNN): a
``[batch head q k]`` matmul computed in query blocks of >= 4 rows gives the same bits as the
unblocked one (fp32, bf16, fp16); fp32 blocks of 1-3 rows take another BLAS kernel (ulp
differences). So blocks here are never smaller than ``MIN_BLOCK`` rows, patterns up to
``SINGLE_BLOCK_BYTES`` are computed in one block (exactly today's op sequence), and a row selection
of fewer queries is padded (repeating its last row) to ``min(MIN_BLOCK, rows of the forward)`` rows,
the row count the full pattern's matmul had (a decode step's single row stays a single row).

Axis legend as in ``workbench.model``: batch, head, kv_head, q_pos, k_pos, d_head.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

MIN_BLOCK = 8                       # rows per block, at least (fp32 BLAS kernels change below 4)
SINGLE_BLOCK_BYTES = 8 * 2**20      # fp32 scores up to this size: one block, as the unblocked path
BLOCK_FRACTION = 8                  # otherwise the per-block temporaries stay under ~1/8 of the pattern
MAX_BLOCK_BYTES = 256 * 2**20       # ... and under this many bytes of fp32 scores

_OBSERVER: contextvars.ContextVar = contextvars.ContextVar("workbench_attention_observer", default=None)


def mask_rows(past_len: int, n_new: int, pad: Optional[torch.Tensor], dtype: torch.dtype, device,
              window: Optional[int], n_keys: int, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Additive mask [batch|1 1 n_rows k_pos]: 0 where the key is visible, ``finfo(dtype).min`` elsewhere.

    Queries are this forward's positions ``rows`` (indices in ``[0, n_new)``; None = all); keys are the
    last ``n_keys`` cache indices. A key at cache index k is visible to the query at cache index q iff
    k <= q, k > q - window (sliding layers) and ``pad`` [batch past+pos] (bool, True = real token)
    marks it real.

    Example::

        mask_rows(0, 4, None, torch.float32, "cpu", None, 4)[0, 0]   # causal 4x4, 0 / -3.4e38
    """
    q_idx = torch.arange(past_len, past_len + n_new, device=device)
    if rows is not None:
        q_idx = q_idx[rows.to(device)]
    start = past_len + n_new - n_keys
    k_idx = torch.arange(start, start + n_keys, device=device)
    allowed = k_idx[None, :] <= q_idx[:, None]                      # [q_pos k_pos]
    if window is not None:
        allowed &= k_idx[None, :] > q_idx[:, None] - window
    allowed = allowed[None, None]                                   # [1 1 q_pos k_pos]
    if pad is not None:
        allowed = allowed & pad.to(device)[:, None, None, start:start + n_keys]
    visible, hidden = torch.zeros((), dtype=dtype, device=device), torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, visible, hidden.to(device))


def block_size(n_rows: int, n_keys: int, n_mats: int, dtype: torch.dtype) -> int:
    """Query rows per block for ``pattern_rows`` over ``n_mats`` (batch x head) matrices."""
    fp32_row = 4 * n_keys * n_mats                                  # one query row of fp32 scores
    pattern_bytes = n_rows * n_keys * n_mats * torch.empty((), dtype=dtype).element_size()
    if n_rows * fp32_row <= SINGLE_BLOCK_BYTES:
        return max(n_rows, 1)
    # temporaries per block: scores (model dtype) + fp32 softmax input/output + mask ~ 2-3 fp32 rows;
    # few large blocks: each op is a parallel region, and on a busy machine every one waits for threads
    rows = min(pattern_bytes // (BLOCK_FRACTION * 3 * fp32_row), MAX_BLOCK_BYTES // fp32_row)
    return int(min(max(rows, MIN_BLOCK), n_rows))


def pattern_rows(q: torch.Tensor, k: torch.Tensor, scale: float,
                 mask: Callable[[int, int], torch.Tensor], out: Optional[torch.Tensor] = None,
                 block: Optional[int] = None) -> torch.Tensor:
    """Attention pattern [batch head q_pos k_pos] (model dtype) of q [batch head q_pos d_head] over
    k [batch head k_pos d_head] (kv heads already repeated), in query blocks written into ``out``.

    Each block runs the explicit path's ops: ``matmul(q, k^T) * scale + mask -> softmax(fp32) -> dtype``;
    ``mask(r0, r1)`` returns the additive mask rows [batch|1 1 r1-r0 k_pos] of queries r0..r1-1.

    Example::

        pattern = pattern_rows(q, k, d_head ** -0.5, lambda r0, r1: causal[:, :, r0:r1])
    """
    b, h, n, _ = q.shape
    t = k.shape[-2]
    if out is None:
        out = q.new_empty((b, h, n, t))
    block = block or block_size(n, t, b * h, q.dtype)
    k_t = k.transpose(2, 3)
    for r0, r1 in _blocks(n, block):
        scores = torch.matmul(q[:, :, r0:r1], k_t).mul_(scale)      # [batch head rows k_pos]
        scores.add_(mask(r0, r1))                                   # in place: same kernels, same bits
        out[:, :, r0:r1] = F.softmax(scores, dim=-1, dtype=torch.float32)
        del scores
    return out


def _blocks(n: int, block: int):
    """[r0, r1) ranges of nearly equal size <= ``block``, none shorter than MIN_BLOCK (unless n is)."""
    count = max(1, math.ceil(n / block))
    count = min(count, max(1, n // MIN_BLOCK))
    bounds = [round(i * n / count) for i in range(count + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


@contextlib.contextmanager
def observe_attention(fn: Callable):
    """Within the block, every attention layer of every forward run in this thread (and context)
    calls ``fn(attn, layer, q, k, masks)`` before attending: ``q`` [batch head pos d_head] and ``k``
    [batch kv_head k_pos d_head] exactly as the attention matmuls receive them (after QK-norm,
    rotary, hooks and the KV cache), ``masks`` the forward's ``Masks`` (``past_len``, ``n_new``,
    ``pad``, ``dtype``: the arguments of ``mask_rows``). The observer must not modify them. Observers do not nest: an
    inner block replaces the outer one until it exits.

    Example::

        seen = []
        with observe_attention(lambda attn, layer, q, k, masks: seen.append(k.shape)):
            model(ids)
    """
    token = _OBSERVER.set(fn)
    try:
        yield fn
    finally:
        _OBSERVER.reset(token)


def notify_attention(attn, layer: int, q: torch.Tensor, k: torch.Tensor, masks) -> None:
    """Called by the model's attention; a no-op unless ``observe_attention`` is active."""
    fn = _OBSERVER.get()
    if fn is not None:
        fn(attn, layer, q, k, masks)
