"""Next-token choice: transformers' logits processors (repetition penalty, temperature, top-k, top-p)
bit for bit, and greedy / multinomial sampling.

Example::

    scores = process_logits(logits, sequences, do_sample=True, temperature=0.7, top_p=0.9)
    next_tokens = sample(scores, do_sample=True, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["check_settings", "process_logits", "process_scores", "repetition_penalty_scores", "sample"]


def process_logits(scores: torch.Tensor, sequences: torch.Tensor, do_sample: bool = False,
                   temperature: float = 1.0, top_k: Optional[int] = 50, top_p: float = 1.0,
                   repetition_penalty: float = 1.0, prompt_start: Optional[torch.Tensor] = None,
                   min_tokens_to_keep: int = 1) -> torch.Tensor:
    """transformers' processors in its order: repetition penalty, then (only when sampling)
    temperature, top-k, top-p. ``scores`` [batch vocab] fp32 -> processed scores (-inf = removed).

    ``sequences`` [batch t] are the tokens so far; ``prompt_start`` [batch] left-padding lengths
    (tokens before it are not penalised). Bit-identical to ``RepetitionPenaltyLogitsProcessor``,
    ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and ``TopPLogitsWarper``.

    >>> process_logits(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2]]), do_sample=True, top_k=2)
    tensor([[-inf, 2., 3.]])
    """
    check_settings(temperature, top_k, top_p, repetition_penalty)
    return process_scores(scores, sequences, do_sample, temperature, top_k, top_p, repetition_penalty,
                          prompt_start, min_tokens_to_keep)


def process_scores(scores, sequences, do_sample, temperature, top_k, top_p, repetition_penalty, prompt_start,
                   min_tokens_to_keep=1):
    """``process_logits`` without the settings check (the decode loop checks them once)."""
    if repetition_penalty != 1.0:
        scores = repetition_penalty_scores(scores, sequences, float(repetition_penalty), prompt_start)
    if not do_sample:
        return scores
    if temperature != 1.0:
        scores = scores / float(temperature)
    if top_k is not None and top_k != 0:
        k = min(max(int(top_k), min_tokens_to_keep), scores.shape[-1])
        scores = scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -float("inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(scores, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - float(top_p))
        remove[..., -min_tokens_to_keep:] = 0
        remove = remove.scatter(1, sorted_idx, remove)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores


def repetition_penalty_scores(scores, sequences, penalty, prompt_start):
    """transformers' ``RepetitionPenaltyLogitsProcessor``: scores of tokens in ``sequences`` (from
    ``prompt_start`` on) divided by ``penalty`` when positive, multiplied when negative."""
    vocab = scores.shape[-1]
    ids = sequences
    if prompt_start is not None:
        pos = torch.arange(ids.shape[1], device=ids.device)
        ids = ids.masked_fill(pos[None, :] < prompt_start.to(ids.device)[:, None], vocab)
    ids = ids.clamp(max=vocab)                               # ids past the vocab land in a dropped column
    padded = torch.nn.functional.pad(scores, (0, 1))
    picked = torch.gather(padded, 1, ids)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return padded.scatter(1, ids, picked)[..., :vocab]


def check_settings(temperature, top_k, top_p, repetition_penalty) -> None:
    """Refuse sampling settings transformers would refuse, naming the setting."""
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        hint = " (for greedy decoding use do_sample=False)" if temperature == 0 else ""
        raise ValueError(f"temperature must be a positive number, got {temperature!r}{hint}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative int (0 or None = off), got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 <= top_p <= 1):
        raise ValueError(f"top_p must be in [0, 1], got {top_p!r}")
    if not isinstance(repetition_penalty, (int, float)) or not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be a positive number, got {repetition_penalty!r}")


def sample(scores: torch.Tensor, do_sample: bool = False, generator: Optional[torch.Generator] = None):
    """Next tokens [batch] from processed scores [batch vocab]: argmax, or one multinomial draw
    from ``softmax(scores)`` (``generator`` for reproducible draws; the global RNG otherwise)."""
    if not do_sample:
        return torch.argmax(scores, dim=-1)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
