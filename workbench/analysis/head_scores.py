"""Attention head scores: previous-token, duplicate-token and induction heads.

Each score is the mean, over the counted query positions of every sequence, of the attention a head
pays to one key position chosen per query:

* previous-token: key ``q - 1`` for every ``q >= 1``;
* duplicate-token: the most recent earlier position holding the same token as ``q``;
* induction: the position just after that earlier occurrence (on repeated random tokens, from each
  position of the second repeat to the token that followed it in the first).

Scores are computed inside a hook on each layer's ``hook_pattern`` (so no ``[layer head q k]`` tensor
is kept) and the forward stops after the last layer's pattern. Hooking the pattern makes those
layers use the explicit attention path.

Example::

    tokens = repeated_random_tokens(model, seq_len=20, n_seqs=8)
    scores = induction_scores(model, tokens)         # [n_layers n_heads]
    (scores > 0.5).nonzero()                         # (layer, head) of induction heads
"""

from __future__ import annotations

from typing import Optional

import torch

from ..hook_names import act_name
from ..hook_points import StopForward


def repeated_random_tokens(model_or_vocab_size, seq_len: int = 20, n_seqs: int = 8, seed: int = 0,
                           bos_token_id: Optional[int] = None, low: Optional[int] = None,
                           high: Optional[int] = None) -> torch.Tensor:
    """``n_seqs`` random sequences of ``seq_len`` tokens, each repeated twice: ``[n_seqs, (1) + 2*seq_len]``.

    Tokens are drawn from ``[low, high)`` (default the whole vocabulary), never equal to
    ``bos_token_id``, and distinct within a repeat whenever the range allows — so every token of the
    second repeat has exactly one earlier occurrence, ``seq_len`` positions back. ``bos_token_id``
    (if given) is prepended. Deterministic in ``seed``.

    Example::

        tokens = repeated_random_tokens(model, seq_len=10, n_seqs=4, bos_token_id=model.cfg.bos_token_id)
    """
    cfg = getattr(model_or_vocab_size, "cfg", None)
    vocab = cfg.vocab_size if cfg is not None else int(model_or_vocab_size)
    low = 0 if low is None else int(low)
    high = vocab if high is None else int(high)
    if not 0 <= low < high <= vocab:
        raise ValueError(f"low/high: need 0 <= low < high <= vocab_size={vocab}, got low={low}, high={high}")
    if seq_len < 1 or n_seqs < 1:
        raise ValueError(f"seq_len and n_seqs must be >= 1, got seq_len={seq_len}, n_seqs={n_seqs}")
    if bos_token_id is not None and not 0 <= bos_token_id < vocab:
        raise ValueError(f"bos_token_id: {bos_token_id} is outside the vocabulary [0, {vocab})")
    skip = bos_token_id is not None and low <= bos_token_id < high
    n = high - low - int(skip)
    if n < 1:
        raise ValueError(f"low/high: [{low}, {high}) holds no token other than bos_token_id")
    gen = torch.Generator().manual_seed(seed)
    if seq_len <= n:
        half = torch.stack([torch.randperm(n, generator=gen)[:seq_len] for _ in range(n_seqs)])
    else:
        half = torch.randint(0, n, (n_seqs, seq_len), generator=gen)
    half = half + low
    if skip:
        half = half + (half >= bos_token_id).long()          # step over the BOS id
    tokens = torch.cat([half, half], dim=1)
    if bos_token_id is not None:
        tokens = torch.cat([torch.full((n_seqs, 1), bos_token_id, dtype=torch.long), tokens], dim=1)
    return tokens


def previous_occurrence(tokens: torch.Tensor) -> torch.Tensor:
    """``[batch pos]`` -> index of the most recent earlier position with the same token, or -1."""
    pos = tokens.shape[1]
    idx = torch.arange(pos, device=tokens.device)
    same = (tokens[:, :, None] == tokens[:, None, :]) & (idx[None, :] < idx[:, None])[None]   # [batch q k]
    return torch.where(same, idx, -1).amax(-1)


def _default_tokens(model, tokens, seq_len, n_seqs, seed):
    if tokens is not None:
        return torch.as_tensor(tokens)
    bos = model.cfg.bos_token_id
    bos = bos if isinstance(bos, int) and 0 <= bos < model.cfg.vocab_size else None
    return repeated_random_tokens(model, seq_len=seq_len, n_seqs=n_seqs, seed=seed, bos_token_id=bos)


@torch.no_grad()
def pattern_scores(model, tokens: torch.Tensor, key_index: torch.Tensor, attention_mask=None) -> torch.Tensor:
    """Mean attention from each query to ``key_index[b, q]`` (queries with -1 are not counted).

    The building block of the named scores: ``[n_layers n_heads]`` float32.

    Example::

        bos_scores = pattern_scores(model, tokens, torch.zeros_like(tokens))   # attention to position 0
    """
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2:
        raise ValueError(f"tokens: expected [batch pos], got shape {tuple(tokens.shape)}")
    if key_index.shape != tokens.shape:
        raise ValueError(f"key_index: expected shape {tuple(tokens.shape)}, got {tuple(key_index.shape)}")
    counted = key_index >= 0
    if attention_mask is not None:
        counted = counted & attention_mask.bool().to(counted.device)
    n = int(counted.sum())
    if n == 0:
        raise ValueError("no query position is counted (e.g. no token occurs twice); use repeated tokens")
    L, H = model.cfg.n_layers, model.cfg.n_heads
    scores = torch.zeros(L, H)

    def score(pattern: torch.Tensor, hook) -> None:       # [batch head q_pos k_pos]
        b, h, q, _ = pattern.shape
        idx = key_index.clamp(min=0).to(pattern.device)[:, None, :, None].expand(b, h, q, 1)
        got = pattern.float().gather(-1, idx)[..., 0]                   # [batch head q_pos]
        mask = counted.to(pattern.device)[:, None, :]
        scores[hook.layer] = ((got * mask).sum((0, 2)) / n).cpu()
        if hook.layer == L - 1:
            raise StopForward                                           # nothing after is needed

    hooks = [(act_name("pattern", i), score) for i in range(L)]
    model.run_with_hooks(tokens.to(model.device if model.device.type != "meta" else "cpu"),
                         fwd_hooks=hooks, attention_mask=attention_mask)
    return scores


def previous_token_scores(model, tokens=None, attention_mask=None, seq_len: int = 20, n_seqs: int = 8,
                          seed: int = 0) -> torch.Tensor:
    """Mean attention from each position ``q >= 1`` to ``q - 1``: ``[n_layers n_heads]``.

    ``tokens`` default: ``repeated_random_tokens`` (with the model's BOS).

    Example::

        previous_token_scores(model, tokens).argmax()   # the most previous-token-like head
    """
    tokens = _default_tokens(model, tokens, seq_len, n_seqs, seed)
    pos = torch.arange(tokens.shape[1])
    key = (pos - 1).expand(tokens.shape[0], -1).clone()                # -1 at q = 0: not counted
    return pattern_scores(model, tokens, key, attention_mask)


def duplicate_token_scores(model, tokens=None, seq_len: int = 20, n_seqs: int = 8, seed: int = 0,
                           attention_mask=None) -> torch.Tensor:
    """Mean attention from each repeated token to its previous occurrence: ``[n_layers n_heads]``.

    Example::

        duplicate_token_scores(model)                    # on repeated random tokens
    """
    tokens = _default_tokens(model, tokens, seq_len, n_seqs, seed)
    return pattern_scores(model, tokens, previous_occurrence(tokens), attention_mask)


def induction_scores(model, tokens=None, seq_len: int = 20, n_seqs: int = 8, seed: int = 0,
                     attention_mask=None) -> torch.Tensor:
    """Mean attention from each repeated token to the token after its previous occurrence: ``[n_layers n_heads]``.

    Example::

        induction_scores(model, seq_len=20, n_seqs=8).max()   # near 1 for a model with induction heads
    """
    tokens = _default_tokens(model, tokens, seq_len, n_seqs, seed)
    prev = previous_occurrence(tokens)
    key = torch.where(prev >= 0, prev + 1, -1)
    return pattern_scores(model, tokens, key, attention_mask)
