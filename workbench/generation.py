"""Generation as a ladder of small named steps: ``resolve_settings`` → ``prepare_prompt`` →
``decode_loop`` (``prefill``, then ``decode_step`` with ``sampling.process_logits``/``sample``, reporting
each token to ``StepCallbacks``: streamer, progress bar, ``on_step``) → ``finish``; ``generate`` runs
the ladder, plus ``TextStreamer`` and ``generate_text``.

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

import inspect
import numbers
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from .hook_points import StopForward, generation_step
from .input_warnings import warn_unused_sampling
from .kv_cache import KVCache
from .sampling import check_settings, process_logits, process_scores, sample
from .streaming import TextStreamer

__all__ = ["GenerationInterrupted", "Prompt", "Settings", "StepCallbacks", "StepInfo", "TextStreamer", "check_input_ids", "decode_loop",
           "decode_step", "finish", "generate", "generate_text", "prefill", "prepare_prompt", "process_logits",
           "resolve_settings", "sample"]

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


class GenerationInterrupted(KeyboardInterrupt):
    """Ctrl-C (or Jupyter's interrupt) during ``generate``: still a KeyboardInterrupt, so a loop over
    prompts stops, with the sequences generated so far in ``tokens`` [batch prompt + new].

    By the time it reaches the caller no hook of the call is attached, the KV cache holds exactly
    the tokens' positions but the last (as after a normal return), and the streamer has ended.

    Example::

        try:
            out = model.generate(ids, max_new_tokens=500)
        except GenerationInterrupted as e:
            out = e.tokens                   # keep the partial result
            raise                            # ... or stop the loop
    """

    def __init__(self, tokens: torch.Tensor) -> None:
        super().__init__(f"generation interrupted after {tokens.shape[1]} tokens (prompt included); "
                         "the sequences so far are in .tokens")
        self.tokens = tokens


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


# ---------------------------------------------------------------------- generate: settings
@dataclass
class Settings:
    """Resolved generation settings (arguments, then ``model.generation_config``, then defaults)."""

    do_sample: bool
    temperature: float
    top_k: Optional[int]
    top_p: float
    repetition_penalty: float
    eos: Optional[list]          # token ids that end a sequence (None: never)
    pad: Optional[int]           # fills finished sequences
    max_new_tokens: int


def resolve_settings(model, n_prompt: int, max_new_tokens=_UnsetInt(20), eos_token_id=None, pad_token_id=None,
                     **sampling) -> Settings:
    """Settings for ``generate``, validated (a clear error before anything runs).

    ``sampling``: do_sample, temperature, top_k, top_p, repetition_penalty (``_Unset`` defaults may
    be overridden by ``model.generation_config``)."""
    gc = getattr(model, "generation_config", None) or {}
    get = gc.get if isinstance(gc, dict) else (lambda k, d=None: getattr(gc, k, d))
    s = {}
    for name, default in _DEFAULTS.items():
        value = sampling.get(name, default)
        if isinstance(value, _Unset):
            value = get(name, None)
            if value is None:
                value = default
        s[name] = value.__class__.__bases__[1](value) if isinstance(value, _Unset) else value
    s["do_sample"] = bool(s["do_sample"])
    if s["do_sample"]:
        check_settings(s["temperature"], s["top_k"], s["top_p"], s["repetition_penalty"])
    else:  # sampling-only settings are unused when greedy (transformers ignores e.g. temperature=0 too)
        check_settings(1.0, None, None, s["repetition_penalty"])
        warn_unused_sampling({k: v for k, v in sampling.items() if not isinstance(v, _Unset)})  # as transformers
    eos = _first_set(eos_token_id, get("eos_token_id", None), model.cfg.eos_token_id)
    eos = None if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos]) or None
    pad = _first_set(pad_token_id, get("pad_token_id", None), model.cfg.pad_token_id)
    if pad is None and eos:
        pad = eos[0]
    if eos is not None and pad is None:
        raise ValueError("pad_token_id is required to pad finished sequences (model.cfg.pad_token_id is None)")
    if pad is not None and not 0 <= pad < model.cfg.vocab_size and any(0 <= e < model.cfg.vocab_size for e in eos or []):
        raise ValueError(f"pad_token_id={pad} is outside the vocabulary [0, {model.cfg.vocab_size}): finished rows are fed it")
    max_new = _resolve_max_new(get, max_new_tokens, n_prompt)
    if isinstance(max_new, numbers.Integral) and not isinstance(max_new, bool):
        max_new = int(max_new)
    if not isinstance(max_new, int) or max_new < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new!r}")
    return Settings(max_new_tokens=max_new, eos=eos, pad=None if pad is None else int(pad), **s)


def _first_set(*values):
    return next((v for v in values if v is not None), None)


def _resolve_max_new(get, value, n_prompt: int):
    """An explicit value wins; else generation_config's max_new_tokens, or max_length (prompt
    included), as transformers; else 20."""
    if not isinstance(value, _Unset):
        return value
    if get("max_new_tokens") is not None:
        return int(get("max_new_tokens"))
    if get("max_length") is not None:
        return max(int(get("max_length")) - n_prompt, 0)
    return 20


# ---------------------------------------------------------------------- generate: prompt preparation
@dataclass
class Prompt:
    """The prompt laid out for decoding: ``out`` [batch prompt+new] (prompt filled in), the attention
    mask over all of it (None without padding), prompt positions, left-padding starts, the KV cache."""

    ids: torch.Tensor                      # [batch n_prompt]
    out: torch.Tensor                      # [batch n_prompt + max_new_tokens]
    full_mask: Optional[torch.Tensor]      # [batch n_prompt + max_new_tokens] or None
    positions: torch.Tensor                # [batch|1 n_prompt] absolute positions
    prompt_start: Optional[torch.Tensor]   # [batch] first real token (left padding) or None
    kv_cache: KVCache

    @property
    def n_prompt(self) -> int:
        return self.ids.shape[1]


def check_input_ids(model, input_ids) -> torch.Tensor:
    """``input_ids`` as a LongTensor [batch pos] on the model's device; a clear error otherwise."""
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


def prepare_prompt(model, input_ids: torch.Tensor, attention_mask, s: Settings,
                   kv_cache: Optional[KVCache] = None) -> Prompt:
    """Lay the prompt out for ``decode_loop``: output buffer, mask, positions (``cumsum(mask) - 1``
    under left padding, as transformers), and the KV cache (a given one must hold a prefix)."""
    batch, n_prompt = input_ids.shape
    mask = _attention_mask(attention_mask, input_ids, s)
    if kv_cache is None:
        kv_cache = KVCache.for_model(model)
    elif not 0 <= kv_cache.seen < n_prompt:
        raise ValueError(f"kv_cache holds {kv_cache.seen} positions; input_ids must be longer than that "
                         f"(the full sequence, of which the cache holds a prefix), got {n_prompt} tokens")
    else:
        kv_cache.check_prefix(input_ids)         # the cache of another prompt would continue that one
    out = input_ids.new_full((batch, n_prompt + s.max_new_tokens), s.pad if s.pad is not None else 0)
    out[:, :n_prompt] = input_ids
    if mask is not None and not bool(mask.all()):
        full_mask = torch.cat([mask, mask.new_ones(batch, s.max_new_tokens)], dim=1)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)       # [batch pos]
        prompt_start = (mask != 0).int().argmax(dim=1)
    else:
        full_mask, prompt_start = None, None
        positions = torch.arange(n_prompt, device=input_ids.device)[None]          # [1 pos]
    return Prompt(input_ids, out, full_mask, positions, prompt_start, kv_cache)


def _attention_mask(attention_mask, input_ids, s: Settings):
    if attention_mask is None:
        if s.pad is not None and s.pad not in (s.eos or []) and bool((input_ids == s.pad).any()):
            return (input_ids != s.pad).long()                      # transformers infers padding
        return None
    mask = torch.as_tensor(attention_mask).to(input_ids.device)
    if mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, "
                         f"got {tuple(mask.shape)}")
    if bool((mask[:, -1] == 0).any()):
        raise ValueError("attention_mask: the last prompt position is padding; generation needs left padding")
    return mask.long()


# ---------------------------------------------------------------------- generate: callbacks
class StepCallbacks:
    """Where the decode loop reports: a ``streamer`` (``put``/``end``), a progress bar (``update``/
    ``close``), and ``on_step(StepInfo)`` with the activations captured into ``store`` this step."""

    def __init__(self, streamer=None, bar=None, on_step: Optional[Callable[[StepInfo], None]] = None,
                 store: Optional[dict] = None, top_k: int = 10) -> None:
        self.streamer, self.bar, self.on_step = streamer, bar, on_step
        self.store = {} if store is None else store
        self.top_k = top_k

    def prompt(self, ids: torch.Tensor) -> None:
        if self.streamer is not None:
            self.streamer.put(ids.cpu())

    def step(self, step: int, tokens, sequences, positions, scores, unfinished) -> None:
        if self.streamer is not None:
            self.streamer.put(tokens.cpu())
        if self.bar is not None:
            self.bar.update(1)
        if self.on_step is not None:
            probs = torch.softmax(scores, dim=-1)
            top_probs, top_ids = torch.topk(probs, min(self.top_k, probs.shape[-1]), dim=-1)
            self.on_step(StepInfo(step=step, new_tokens=tokens.clone(), sequences=sequences.clone(),
                                  positions=positions, top_ids=top_ids, top_probs=top_probs,
                                  activations=dict(self.store), finished=~unfinished))
        self.store.clear()

    def close(self) -> None:
        self.store.clear()
        if self.bar is not None:
            self.bar.close()
        if self.streamer is not None:
            self.streamer.end()


# ---------------------------------------------------------------------- generate: decode loop
def decode_loop(model, prompt: Prompt, s: Settings, callbacks: StepCallbacks,
                generator: Optional[torch.Generator] = None, stop=None) -> int:
    """Prefill, then one token per step until ``max_new_tokens``, every sequence finished or ``stop``;
    returns how many positions of ``prompt.out`` are filled. A hook raising ``StopForward`` ends it
    cleanly; KeyboardInterrupt is re-raised as ``GenerationInterrupted`` carrying the tokens so far.
    Either way the KV cache rolls back a half-run forward."""
    t, total, step = prompt.n_prompt, prompt.out.shape[1], 0
    if s.max_new_tokens == 0:
        return t
    kv, out, mask = prompt.kv_cache, prompt.out, prompt.full_mask
    eos = None if s.eos is None else torch.tensor(s.eos, device=out.device)
    unfinished = torch.ones(out.shape[0], dtype=torch.bool, device=out.device)
    try:
        seen = kv.seen
        step_positions = prompt.positions[:, seen:]
        with generation_step(0):
            logits = prefill(model, prompt.ids[:, seen:], kv, None if mask is None else mask[:, :t], step_positions)
        while True:
            scores = process_scores(logits, out[:, :t], s.do_sample, s.temperature, s.top_k, s.top_p,
                                    s.repetition_penalty, prompt.prompt_start)
            nan_rows = torch.isnan(logits).any(-1) & unfinished    # hardB (issue 15.5): read with the EOS check
            tokens = sample(scores, s.do_sample, generator)
            if eos is not None:
                tokens = torch.where(unfinished, tokens, s.pad)
                unfinished &= ~torch.isin(tokens, eos)
            any_nan, any_left = torch.stack([nan_rows.any(), unfinished.any()]).tolist()   # one sync per step
            if any_nan:
                raise FloatingPointError(f"generate: NaN logits at step {step} in row(s) {nan_rows.nonzero().flatten().tolist()}"
                                         "; check the weights, the dtype (float16 overflow?) and hooks")
            out[:, t] = tokens
            t += 1
            callbacks.step(step, tokens, out[:, :t], step_positions, scores, unfinished)
            if t >= total or not any_left or _stopped(stop):
                return t
            step += 1
            step_positions = prompt.positions[:, -1:] + step
            with generation_step(step):
                logits = decode_step(model, tokens, kv, None if mask is None else mask[:, :t], step_positions)
    except StopForward:
        kv.rollback()              # a forward cut short leaves no half-updated layer behind
        return t
    except KeyboardInterrupt as e:
        kv.rollback()
        raise GenerationInterrupted(finish(prompt, t)) from (None if isinstance(e, GenerationInterrupted) else e)


def _stopped(stop) -> bool:
    if stop is None:
        return False
    if isinstance(stop, threading.Event):
        return stop.is_set()
    return bool(stop())


# ---------------------------------------------------------------------- generate: finishing
def finish(prompt: Prompt, t: int) -> torch.Tensor:
    """The sequences ``[batch prompt + new]``, cut after the last filled position."""
    return prompt.out[:, :t] if t < prompt.out.shape[1] else prompt.out


def _progress(progress: bool, total: int):
    if not progress:
        return None
    from tqdm.auto import tqdm   # optional display dependency, loaded only when asked for

    return tqdm(total=total, desc="generate", unit="tok")


def generate(model, input_ids, attention_mask=None, max_new_tokens: int = _UnsetInt(20),
             do_sample: bool = _DEFAULTS["do_sample"], temperature: float = _DEFAULTS["temperature"],
             top_k: Optional[int] = _DEFAULTS["top_k"], top_p: float = _DEFAULTS["top_p"],
             repetition_penalty: float = _DEFAULTS["repetition_penalty"], eos_token_id=None, pad_token_id=None,
             generator: Optional[torch.Generator] = None, streamer=None, fwd_hooks=None,
             on_step: Optional[Callable[[StepInfo], None]] = None, capture=None, capture_top_k: int = 10,
             stop: Union[threading.Event, Callable[[], bool], None] = None, progress: bool = False,
             kv_cache: Optional[KVCache] = None) -> torch.Tensor:
    """Generate up to ``max_new_tokens`` per sequence; returns ``[batch, prompt + new]`` token ids.

    The ladder: ``resolve_settings`` -> ``prepare_prompt`` -> ``decode_loop`` (reporting to
    ``StepCallbacks``) -> ``finish``.

    ``input_ids`` [batch pos] (left-padded for batches, with ``attention_mask`` [batch pos]; when
    it is None, tokens equal to ``pad_token_id`` count as padding, as in transformers, unless
    pad == eos). Sampling settings not passed come from ``model.generation_config`` (a dict from
    the checkpoint's generation_config.json) when it sets them, else transformers' defaults shown
    in the signature; ``eos_token_id`` / ``pad_token_id`` default to it and then to ``model.cfg``.
    ``eos_token_id=[]`` turns EOS stopping off.

    ``fwd_hooks`` [(name or predicate, fn)] are attached for the whole generation (this call and
    thread only); inside them ``hook.ctx.step`` is 0 for the prefill and 1, 2, ... for decode steps.
    ``capture`` (a ``names_filter``) with ``on_step`` delivers each step's activations (see
    ``StepInfo``). ``stop`` (a ``threading.Event`` or a callable returning True) and a hook raising
    ``StopForward`` end generation cleanly with the tokens so far. KeyboardInterrupt (Ctrl-C, Jupyter's
    interrupt) reaches the caller as ``GenerationInterrupted`` (a KeyboardInterrupt) whose ``tokens``
    hold the sequences so far; the streamer has had them. In every case no hook stays attached.
    ``kv_cache``: a cache already holding the first ``kv_cache.seen`` tokens of ``input_ids`` (e.g. a
    ``clone()`` of a shared prompt prefix; another prompt's cache is refused); it is extended in place.

    >>> model.generate(ids, max_new_tokens=5).shape                             # doctest: +SKIP
    torch.Size([1, 12])
    """
    input_ids = check_input_ids(model, input_ids)
    s = resolve_settings(model, input_ids.shape[1], max_new_tokens, eos_token_id, pad_token_id,
                         do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                         repetition_penalty=repetition_penalty)
    if capture is not None and on_step is None:
        raise ValueError("capture=... needs on_step=fn(StepInfo) to receive the activations")
    if capture_top_k < 1:
        raise ValueError(f"capture_top_k must be >= 1, got {capture_top_k}")
    prompt = prepare_prompt(model, input_ids, attention_mask, s, kv_cache)
    store, capture_hooks = ({}, []) if capture is None else model.cache_hooks(capture)
    callbacks = StepCallbacks(streamer, _progress(progress, s.max_new_tokens), on_step, store, capture_top_k)
    callbacks.prompt(input_ids)
    try:
        with torch.no_grad(), model.hooks(fwd_hooks=list(fwd_hooks or ()) + capture_hooks):
            t = decode_loop(model, prompt, s, callbacks, generator, stop)
    finally:
        callbacks.close()
    return finish(prompt, t)


# ---------------------------------------------------------------------- text in, text out
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
