"""Generation as a ladder of small functions: ``process_logits``/``sample`` → ``prefill`` →
``decode_step`` → ``generate(..., on_step=...)``, plus ``TextStreamer`` and ``generate_text``.

Semantics follow transformers' ``generate`` (greedy unless ``do_sample``; repetition penalty →
temperature → top-k → top-p exactly as its logits processors; left-padded batches take positions
``cumsum(attention_mask) - 1``; finished sequences are padded with ``pad_token_id``; defaults from
``model.generation_config``). Greedy decoding on the explicit attention path is token-identical to
transformers' eager ``generate``.

What transformers does not give you: hooks fire on the prefill (``hook.ctx.step == 0``) and on
every decode step (``step >= 1``, one new position at ``hook.ctx.positions``), and
``capture=names_filter`` with ``on_step=fn(StepInfo)`` hands over each step's activations for the
new positions only, with the top-k next-token probabilities.

Example::

    ids = model.generate(prompt_ids, max_new_tokens=100, do_sample=True, temperature=0.3)

    def steer(resid, hook):                     # add a direction to generated positions only
        if hook.ctx.step and hook.ctx.step >= 1:
            return resid + direction
    ids = model.generate(prompt_ids, fwd_hooks=[("blocks.3.hook_resid_post", steer)])

    def show(info):                             # live view: one new position per step
        print(info.step, info.new_tokens, info.activations["blocks.0.hook_resid_post"].shape)
    model.generate(prompt_ids, capture=lambda n: n.endswith("resid_post"), on_step=show)
"""

from __future__ import annotations

import numbers

import inspect
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from .hook_points import StopForward
from .input_warnings import warn_unused_sampling
from .kv_cache import KVCache



class _Unset:
    """Marks a default that was not passed: ``model.generation_config`` may override it (an explicit
    argument always wins, as in transformers). Instances equal and print as the plain default."""

    def __repr__(self) -> str:
        return repr(self.__class__.__bases__[1](self))


class _UnsetFloat(_Unset, float):
    pass


class _UnsetInt(_Unset, int):
    pass


class _UnsetBool(_Unset, int):
    def __repr__(self) -> str:
        return repr(bool(self))


# transformers' global generation defaults (GenerationConfig._get_default_generation_params)
_DEFAULTS = dict(do_sample=_UnsetBool(False), temperature=_UnsetFloat(1.0), top_k=_UnsetInt(50),
                 top_p=_UnsetFloat(1.0), repetition_penalty=_UnsetFloat(1.0))


@dataclass
class StepInfo:
    """What ``on_step`` receives after the prefill (``step == 0``) and after every decode step.

    ``new_tokens`` [batch] the token chosen this step (``pad_token_id`` for finished rows);
    ``sequences`` [batch t] all tokens so far including it; ``positions`` [batch|1 n] absolute
    positions of the tensors in ``activations`` (prefill: the prompt, decode: one position);
    ``top_ids`` / ``top_probs`` [batch k] the processed next-token distribution the token was
    chosen from; ``activations`` hook name -> tensor for this step's positions only (attention
    patterns ``[batch head n k_pos]`` over the keys the cache kept); ``finished`` [batch].
    """

    step: int
    new_tokens: torch.Tensor
    sequences: torch.Tensor
    positions: torch.Tensor
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    activations: dict = field(default_factory=dict)
    finished: Optional[torch.Tensor] = None


# ---------------------------------------------------------------------- logits processing, sampling
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
    _check_settings(temperature, top_k, top_p, repetition_penalty)
    return _process(scores, sequences, do_sample, temperature, top_k, top_p, repetition_penalty,
                    prompt_start, min_tokens_to_keep)


def _process(scores, sequences, do_sample, temperature, top_k, top_p, repetition_penalty, prompt_start,
             min_tokens_to_keep=1):
    if repetition_penalty != 1.0:
        scores = _repetition_penalty(scores, sequences, float(repetition_penalty), prompt_start)
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


def _repetition_penalty(scores, sequences, penalty, prompt_start):
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


def _check_settings(temperature, top_k, top_p, repetition_penalty) -> None:
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


# ---------------------------------------------------------------------- forwards
def prefill(model, input_ids: torch.Tensor, kv_cache: KVCache, attention_mask=None, position_ids=None):
    """Run the (uncached part of the) prompt into ``kv_cache``; logits of its last position [batch vocab] fp32.

    ``input_ids`` [batch n] are the tokens after the ``kv_cache.seen`` already cached ones;
    ``attention_mask`` [batch seen+n] covers both. Only the last position is unembedded when the
    model supports ``logits_to_keep`` and nothing hooks the logits (as transformers' generate)."""
    logits = model(input_ids, attention_mask=attention_mask, position_ids=position_ids, kv_cache=kv_cache,
                   **_last_logits_only(model))
    return logits[:, -1].to(dtype=torch.float32, copy=True)


def decode_step(model, tokens: torch.Tensor, kv_cache: KVCache, attention_mask=None, position_ids=None):
    """One new token per sequence (``tokens`` [batch]) through the cached model; logits [batch vocab] fp32."""
    logits = model(tokens[:, None], attention_mask=attention_mask, position_ids=position_ids, kv_cache=kv_cache)
    return logits[:, -1].to(dtype=torch.float32, copy=True)


def _last_logits_only(model) -> dict:
    # Hooks on the logits see every prompt position (capture's contract), so then keep them all.
    cls = type(model)
    if cls not in _KEEPS_LOGITS:
        _KEEPS_LOGITS[cls] = "logits_to_keep" in inspect.signature(cls.forward).parameters
    hooked = model.hook_logits.has_hooks or model.hook_logits_unscaled.has_hooks
    return {"logits_to_keep": 1} if _KEEPS_LOGITS[cls] and not hooked else {}


_KEEPS_LOGITS: dict = {}


# ---------------------------------------------------------------------- generate
def generate(model, input_ids, attention_mask=None, max_new_tokens: int = _UnsetInt(20),
             do_sample: bool = _DEFAULTS["do_sample"], temperature: float = _DEFAULTS["temperature"],
             top_k: Optional[int] = _DEFAULTS["top_k"], top_p: float = _DEFAULTS["top_p"],
             repetition_penalty: float = _DEFAULTS["repetition_penalty"], eos_token_id=None, pad_token_id=None,
             generator: Optional[torch.Generator] = None, streamer=None, fwd_hooks=None,
             on_step: Optional[Callable[[StepInfo], None]] = None, capture=None, capture_top_k: int = 10,
             stop: Union[threading.Event, Callable[[], bool], None] = None, progress: bool = False,
             kv_cache: Optional[KVCache] = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` per sequence; returns ``[batch, prompt + new]`` token ids.

    ``input_ids`` [batch pos] (left-padded for batches, with ``attention_mask`` [batch pos]; when
    it is None, tokens equal to ``pad_token_id`` count as padding, as in transformers, unless
    pad == eos). Sampling settings not passed come from ``model.generation_config`` (a dict from
    the checkpoint's generation_config.json) when it sets them, else transformers' defaults shown
    in the signature; ``eos_token_id`` / ``pad_token_id`` default to it and then to ``model.cfg``.
    ``eos_token_id=[]`` turns EOS stopping off.

    ``fwd_hooks`` [(name or predicate, fn)] are attached for the whole generation; inside them
    ``hook.ctx.step`` is 0 for the prefill and 1, 2, ... for decode steps. ``capture`` (a
    ``names_filter``) with ``on_step`` delivers each step's activations (see ``StepInfo``).
    ``stop`` (a ``threading.Event`` or a callable returning True), KeyboardInterrupt and a hook
    raising ``StopForward`` end generation cleanly with the tokens so far; no hook stays attached.
    ``kv_cache``: a cache already holding the first ``kv_cache.seen`` tokens of ``input_ids``
    (e.g. a ``clone()`` of a shared prompt prefix); it is extended in place.

    >>> model.generate(ids, max_new_tokens=5).shape                             # doctest: +SKIP
    torch.Size([1, 12])
    """
    s = _settings(model, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                  repetition_penalty=repetition_penalty, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    input_ids = _check_input_ids(model, input_ids)
    max_new_tokens = _resolve_max_new(model, max_new_tokens, input_ids.shape[1])
    if isinstance(max_new_tokens, numbers.Integral) and not isinstance(max_new_tokens, bool):
        max_new_tokens = int(max_new_tokens)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if capture is not None and on_step is None:
        raise ValueError("capture=... needs on_step=fn(StepInfo) to receive the activations")
    if capture_top_k < 1:
        raise ValueError(f"capture_top_k must be >= 1, got {capture_top_k}")
    device = input_ids.device
    batch, n_prompt = input_ids.shape
    mask = _attention_mask(attention_mask, input_ids, s)
    if kv_cache is None:
        kv_cache = KVCache.for_model(model)
    elif not 0 <= kv_cache.seen < n_prompt:
        raise ValueError(f"kv_cache holds {kv_cache.seen} positions; input_ids must be longer than that "
                         f"(the full sequence, of which the cache holds a prefix), got {n_prompt} tokens")
    eos = None if s["eos"] is None else torch.tensor(s["eos"], device=device)
    pad = s["pad"]
    if eos is not None and pad is None:
        raise ValueError("pad_token_id is required to pad finished sequences (model.cfg.pad_token_id is None)")
    total = n_prompt + max_new_tokens
    out = input_ids.new_full((batch, total), pad if pad is not None else 0)
    out[:, :n_prompt] = input_ids
    padded = mask is not None and not bool(mask.all())
    full_mask = torch.cat([mask, mask.new_ones(batch, max_new_tokens)], dim=1) if padded else None
    if padded:
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)       # [batch pos]
        prompt_start = (mask != 0).int().argmax(dim=1)
    else:
        positions = torch.arange(n_prompt, device=device)[None]                   # [1 pos]
        prompt_start = None
    unfinished = torch.ones(batch, dtype=torch.bool, device=device)
    store, capture_hooks = ({}, []) if capture is None else model.cache_hooks(capture)
    hooks = list(fwd_hooks or ()) + capture_hooks
    t, step = n_prompt, 0
    bar = _progress(progress, max_new_tokens)
    ctx = model.hook_ctx
    if streamer is not None:
        streamer.put(input_ids.cpu())
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=hooks):
            if max_new_tokens == 0:
                return out
            seen = kv_cache.seen
            ctx.step = 0
            logits = prefill(model, input_ids[:, seen:], kv_cache,
                             full_mask[:, :n_prompt] if padded else None, positions[:, seen:])
            while True:
                scores = _process(logits, out[:, :t], s["do_sample"], s["temperature"], s["top_k"], s["top_p"],
                                  s["repetition_penalty"], prompt_start)
                tokens = sample(scores, bool(s["do_sample"]), generator)
                if eos is not None:
                    tokens = torch.where(unfinished, tokens, pad)
                out[:, t] = tokens
                t += 1
                if eos is not None:
                    unfinished &= ~torch.isin(tokens, eos)
                if streamer is not None:
                    streamer.put(tokens.cpu())
                if bar is not None:
                    bar.update(1)
                if on_step is not None:
                    on_step(_step_info(step, tokens, out[:, :t], ctx.positions, scores, capture_top_k,
                                       store, unfinished))
                    store.clear()
                if t >= total or not bool(unfinished.any()) or _stopped(stop):
                    break
                step += 1
                ctx.step = step
                logits = decode_step(model, tokens, kv_cache, full_mask[:, :t] if padded else None,
                                     positions[:, -1:] + step)
    except (KeyboardInterrupt, StopForward):
        kv_cache.rollback()              # a forward cut short leaves no half-updated layer behind
    finally:
        ctx.step = None
        store.clear()
        if bar is not None:
            bar.close()
        if streamer is not None:
            streamer.end()
    return out[:, :t] if t < total else out


def _settings(model, **given) -> dict:
    gc = getattr(model, "generation_config", None) or {}
    get = gc.get if isinstance(gc, dict) else (lambda k, d=None: getattr(gc, k, d))
    s = {}
    for name, default in _DEFAULTS.items():
        value = given[name]
        if isinstance(value, _Unset):
            value = get(name, None)
            if value is None:
                value = default
        s[name] = value.__class__.__bases__[1](value) if isinstance(value, _Unset) else value
    s["do_sample"] = bool(s["do_sample"])
    cfg = model.cfg
    eos = given["eos_token_id"]
    if eos is None:
        eos = get("eos_token_id", None)
    if eos is None:
        eos = cfg.eos_token_id
    s["eos"] = None if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos]) or None
    pad = given["pad_token_id"]
    if pad is None:
        pad = get("pad_token_id", None)
    if pad is None:
        pad = cfg.pad_token_id
    if pad is None and s["eos"]:
        pad = s["eos"][0]
    s["pad"] = None if pad is None else int(pad)
    if s["do_sample"]:
        _check_settings(s["temperature"], s["top_k"], s["top_p"], s["repetition_penalty"])
    else:  # sampling-only settings are unused when greedy (transformers ignores e.g. temperature=0 too)
        _check_settings(1.0, None, None, s["repetition_penalty"])
        warn_unused_sampling({k: v for k, v in given.items() if not isinstance(v, _Unset)})  # as transformers
    return s


def _resolve_max_new(model, value, n_prompt: int):
    """An explicit value wins; else generation_config's max_new_tokens, or max_length (prompt
    included), as transformers; else 20."""
    if not isinstance(value, _Unset):
        return value
    gc = getattr(model, "generation_config", None) or {}
    get = gc.get if isinstance(gc, dict) else (lambda k, d=None: getattr(gc, k, d))
    if get("max_new_tokens") is not None:
        return int(get("max_new_tokens"))
    if get("max_length") is not None:
        return max(int(get("max_length")) - n_prompt, 0)
    return 20


def _check_input_ids(model, input_ids) -> torch.Tensor:
    if not isinstance(input_ids, torch.Tensor):
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a non-empty [batch, pos] tensor, got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise ValueError(f"input_ids: expected integer token ids, got dtype {input_ids.dtype}")
    vocab = model.cfg.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"input_ids: token ids must be in [0, {vocab}), got range "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    return input_ids.long().to(model.device)


def _attention_mask(attention_mask, input_ids, s):
    if attention_mask is None:
        pad, eos = s["pad"], s["eos"] or []
        if pad is not None and pad not in eos and bool((input_ids == pad).any()):
            return (input_ids != pad).long()                      # transformers infers padding
        return None
    mask = torch.as_tensor(attention_mask).to(input_ids.device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, "
                         f"got {tuple(mask.shape)}")
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("attention_mask: the last prompt position is padding; generation needs left padding")
    return mask.long()


def _step_info(step, tokens, sequences, positions, scores, k, store, unfinished) -> StepInfo:
    probs = torch.softmax(scores, dim=-1)
    top_probs, top_ids = torch.topk(probs, min(k, probs.shape[-1]), dim=-1)
    return StepInfo(step=step, new_tokens=tokens.clone(), sequences=sequences.clone(), positions=positions,
                    top_ids=top_ids, top_probs=top_probs, activations=dict(store), finished=~unfinished)


def _stopped(stop) -> bool:
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())


def _progress(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="generate", unit="tok")


# ---------------------------------------------------------------------- text in, text out
class TextStreamer:
    """Print decoded text as tokens arrive (``generate(..., streamer=TextStreamer(tok))``).

    Holds back a trailing incomplete UTF-8 character (a multi-byte character split across byte
    tokens decodes to U+FFFD until its last byte arrives), so the printed text is always the
    decoded text. Batch size 1 only, as transformers' ``TextStreamer``. Override
    ``on_finalized_text`` to send text elsewhere (a widget).

    >>> model.generate(ids, streamer=TextStreamer(tok), max_new_tokens=20)     # doctest: +SKIP
    """

    def __init__(self, tokenizer, skip_prompt: bool = True, skip_special_tokens: bool = False, file=None) -> None:
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.skip_special_tokens = skip_special_tokens
        self.file = file
        self.token_cache: list[int] = []
        self.print_len = 0
        self.next_tokens_are_prompt = True

    def _decode(self, ids) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, value) -> None:
        """Receive the prompt (first call) or a new token; print what became final."""
        value = torch.as_tensor(value)
        if value.dim() > 1:
            if value.shape[0] > 1:
                raise ValueError(f"TextStreamer supports batch size 1 only, got ids of shape {tuple(value.shape)}")
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.next_tokens_are_prompt = False
        self.token_cache.extend(value.reshape(-1).tolist())
        text = self._decode(self.token_cache)
        stable = text.rstrip("\ufffd")                     # a split multi-byte character is not final yet
        printable = stable[self.print_len:]
        self.print_len = max(self.print_len, len(stable))
        if text.endswith("\n"):                           # a finished line: restart (byte-level decoding
            self.token_cache, self.print_len = [], 0       # concatenates), keeping decoding cost bounded
        if printable:
            self.on_finalized_text(printable)

    def end(self) -> None:
        """Flush what is left (even an incomplete character) and end the line."""
        text = self._decode(self.token_cache) if self.token_cache else ""
        printable = text[self.print_len:]
        self.token_cache, self.print_len = [], 0
        self.next_tokens_are_prompt = True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        print(text, flush=True, end="\n" if stream_end else "", file=self.file)


def generate_text(model, tokenizer, messages_or_prompt: Union[str, Sequence[dict]], chat_template=None,
                  **generate_kwargs) -> str:
    """Apply the chat template, generate, and return the decoded reply (special tokens removed).

    A string is one user message (plain text with BOS when the tokenizer has no chat template).

    >>> generate_text(model, tok, "Hello, how are you?", max_new_tokens=30)   # doctest: +SKIP
    """
    if isinstance(messages_or_prompt, str):
        if getattr(tokenizer, "chat_templates", None) or chat_template is not None:
            messages = [{"role": "user", "content": messages_or_prompt}]
        else:
            ids = torch.tensor([tokenizer.encode(messages_or_prompt)], dtype=torch.long)
            messages = None
    else:
        messages = list(messages_or_prompt)
    if messages is not None:
        ids = tokenizer.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                            tokenize=True, return_tensors="pt")
        if isinstance(ids, dict):
            ids = ids["input_ids"]
    out = generate(model, ids, **generate_kwargs)
    reply = out[0, ids.shape[1]:].tolist()
    return tokenizer.decode(reply, skip_special_tokens=True)
