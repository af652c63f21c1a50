"""Prompts -> token lists -> length-bucketed shards -> left-padded, masked batches.

Prompts are sorted by length (ties keep input order) and cut into shards of ``shard_size`` prompts, and each
shard into batches of ``batch_size``, so a batch holds prompts of nearly equal length and little compute goes
to padding. Batches are left-padded as ``generate`` pads them: ``attention_mask`` is 1 on real tokens and
``position_ids = cumsum(attention_mask) - 1`` (0 on the pads), so every real token sees the same keys and the
same rotary position as when its prompt runs alone.

Example::

    tokens = normalize_inputs(["a b", "c"], tokenizer=tok)
    plan = plan_shards(tokens, shard_size=16)
    for batch in make_batches(tokens, plan[0].prompt_ids, batch_size=8, pad_id=0):
        model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch

PositionSpec = Union[str, Callable]


@dataclass
class Batch:
    """One left-padded batch of prompts, what ``map_prompts``' ``fn(model, batch)`` receives.

    ``input_ids`` [batch pos] (pads on the left, ``pos`` = the longest prompt), ``attention_mask`` [batch pos]
    (1 = real token), ``position_ids`` [batch pos] (``cumsum(mask) - 1``, 0 on pads): pass all three to the
    model. ``prompt_indices`` [batch] the prompts' indices in the dataset; ``lengths`` [batch] their token
    counts. Prompt ``b``'s real tokens are the last ``lengths[b]`` columns, so column ``-1`` is every prompt's
    last token.

    Example::

        def last_logit_of(model, batch):
            logits = model(batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
            return {"top": logits[:, -1].argmax(-1)}            # one value per prompt
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    prompt_indices: torch.Tensor
    lengths: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def real(self, x: torch.Tensor, b: int) -> torch.Tensor:
        """Prompt ``b``'s real positions of a [batch pos ...] tensor: ``x[b, pos - lengths[b]:]``."""
        return x[b, x.shape[1] - int(self.lengths[b]):]

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids)),
                     self.prompt_indices, self.lengths)


@dataclass
class ShardPlan:
    """The prompts of one shard, in the order they are batched and stored."""

    index: int
    prompt_ids: list

    @property
    def file(self) -> str:
        return shard_file(self.index)


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


# ---------------------------------------------------------------------------------------- inputs
def _column(inputs):
    """A datasets.Dataset column (or any sequence-like object) as a plain list, without importing datasets."""
    if isinstance(inputs, (str, bytes)):
        raise TypeError("inputs: expected a sequence of prompts (strings or token-id lists), got one string; "
                        "wrap it in a list")
    if isinstance(inputs, torch.Tensor):
        if inputs.dim() != 2:
            raise TypeError(f"inputs: a tensor of token ids must be [prompt pos], got shape {tuple(inputs.shape)}")
        return [row.tolist() for row in inputs]
    if hasattr(inputs, "column_names") and not isinstance(inputs, (list, tuple)):
        names = list(inputs.column_names)
        raise TypeError(f"inputs: a datasets.Dataset has columns {names}; pass one of them, e.g. ds[{names[0]!r}]")
    try:
        return list(inputs)
    except TypeError:
        raise TypeError(f"inputs: expected a list of prompts, got {type(inputs).__name__}") from None


def normalize_inputs(inputs, tokenizer=None, vocab_size: Optional[int] = None) -> list[list[int]]:
    """Token-id lists (or tensors), strings, or a dataset column -> list of token-id lists, checked.

    Strings are encoded with ``tokenizer.encode`` (which adds ``<BOS_TOKEN>``). Empty prompts and ids
    outside ``[0, vocab_size)`` are refused with the prompt's index.
    """
    items = _column(inputs)
    if not items:
        raise ValueError("inputs: no prompts given")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError(f"inputs[{i}] is a string but no tokenizer is available: pass tokenizer= "
                                 "(workbench.Tokenizer.from_pretrained(path)) or a model name/path")
            ids = tokenizer.encode(item)
        elif isinstance(item, torch.Tensor):
            if item.dim() != 1 or item.is_floating_point():
                raise ValueError(f"inputs[{i}]: a tensor prompt must be 1-D integer ids, got "
                                 f"{item.dtype} of shape {tuple(item.shape)}")
            ids = item.tolist()
        else:
            try:
                ids = [int(t) for t in item]
            except (TypeError, ValueError):
                raise TypeError(f"inputs[{i}]: expected a string or a list of token ids, got "
                                f"{type(item).__name__}") from None
        if not ids:
            raise ValueError(f"inputs[{i}]: empty prompt (0 tokens); every prompt needs at least one token")
        if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
            raise ValueError(f"inputs[{i}]: token ids must be in [0, vocab_size={vocab_size}), got min "
                             f"{min(ids)}, max {max(ids)}")
        out.append(ids)
    return out


def inputs_fingerprint(tokens: list[list[int]]) -> str:
    """sha256 of the token lists (their order and content): a resumed run must see the same prompts."""
    h = hashlib.sha256(b"workbench.experiments.inputs.v1")
    for ids in tokens:
        h.update(len(ids).to_bytes(8, "little"))
        h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------- positions
def positions_label(positions: PositionSpec) -> str:
    """How a positions choice is recorded in the manifest ("all", "last" or "callable:module.name")."""
    if isinstance(positions, str) and positions in ("all", "last"):
        return positions
    if callable(positions):
        return callable_label(positions)
    raise ValueError(f"positions: expected 'all', 'last' or a callable fn(token_ids) -> positions, got {positions!r}")


def callable_label(fn: Callable) -> str:
    """``callable:module.name#hash`` where the hash covers the function's bytecode and constants, so a resumed
    run refuses an edited function (values captured in a closure are not covered)."""
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    code = getattr(fn, "__code__", None)
    if code is None:
        return f"callable:{name}"
    digest = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:12]
    return f"callable:{name}#{digest}"


def select_positions(positions: PositionSpec, tokens: list[list[int]]) -> list[list[int]]:
    """Per prompt, the sorted positions (0 = its first token) whose activations are stored.

    A callable gets the prompt's token ids (a list) and returns positions (ints, negative counting from the
    end) or a boolean mask of the prompt's length.
    """
    positions_label(positions)
    out = []
    for i, ids in enumerate(tokens):
        n = len(ids)
        if positions == "all":
            out.append(list(range(n)))
            continue
        if positions == "last":
            out.append([n - 1])
            continue
        got = positions(list(ids))
        got = got.tolist() if isinstance(got, torch.Tensor) else list(got)
        if got and all(isinstance(g, bool) for g in got):
            if len(got) != n:
                raise ValueError(f"positions(inputs[{i}]): a boolean mask must have the prompt's length {n}, "
                                 f"got {len(got)}")
            got = [p for p, keep in enumerate(got) if keep]
        sel = []
        for p in got:
            if isinstance(p, bool) or not isinstance(p, int) or not -n <= p < n:
                raise ValueError(f"positions(inputs[{i}]): expected ints in [-{n}, {n}) or a bool mask, got {p!r}")
            sel.append(p % n)
        if not sel:
            raise ValueError(f"positions(inputs[{i}]) selected no position; select at least one")
        if len(set(sel)) != len(sel):
            raise ValueError(f"positions(inputs[{i}]) selected a position twice: {got}")
        out.append(sorted(sel))
    return out


# ---------------------------------------------------------------------------------------- plan, batches
def plan_shards(tokens: list[list[int]], shard_size: int) -> list[ShardPlan]:
    """Sort prompts by length (stable) and cut them into shards of ``shard_size`` prompts."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size: expected a positive int (prompts per shard), got {shard_size!r}")
    order = sorted(range(len(tokens)), key=lambda i: (len(tokens[i]), i))
    return [ShardPlan(s, order[a:a + shard_size]) for s, a in enumerate(range(0, len(order), shard_size))]


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int):
    """(input_ids, attention_mask, position_ids) [batch pos] for left padding, as ``generate`` builds them."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[b, width - len(s):] = 1
    position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)      # [batch pos]
    return ids, mask, position_ids


def make_batches(tokens: list[list[int]], prompt_ids: Sequence[int], batch_size: int, pad_id: int,
                 device=None) -> Iterator[Batch]:
    """Consecutive groups of ``batch_size`` of ``prompt_ids`` as left-padded batches (on ``device``)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
    for a in range(0, len(prompt_ids), batch_size):
        group = list(prompt_ids[a:a + batch_size])
        seqs = [tokens[i] for i in group]
        ids, mask, pos = left_pad(seqs, pad_id)
        batch = Batch(ids, mask, pos, torch.tensor(group, dtype=torch.long),
                      torch.tensor([len(s) for s in seqs], dtype=torch.long))
        yield batch.to(device) if device is not None else batch
