"""GenerationView: watch the model generate: the token stream, attention and logit lens, updated every step.

``run()`` calls ``model.generate(..., capture=..., on_step=...)`` in the cell. Widget updates are comm messages
that leave the kernel while the cell runs, so the page updates live. Clicks are different: a busy kernel
processes incoming comm messages only after the cell ends, so the Stop button cannot reach a ``run()`` in
progress (use JupyterLab's interrupt ■ instead: ``generate`` ends cleanly on KeyboardInterrupt). ``run_async()``
generates on a background thread and returns at once; the kernel stays idle, the Stop button works, and it sets
the ``threading.Event`` passed as ``stop=``. Either way no hook stays attached (``generate`` removes them in
``finally``).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Optional, Sequence

import ipywidgets as W
import torch

from ._base import RecordCache, esc, records_json, resolve_ids, snapshot_page
from .attention_view import AttentionView
from .logit_lens_view import LogitLensView, lens_step, resid_names
from .token_view import TokenView


class GenerationView(W.VBox):
    """Live dashboard for one generation.

    Example::

        from workbench.widgets import GenerationView
        view = GenerationView(model, tok, [{"role": "user", "content": "Hi"}], max_new_tokens=40)
        view                     # display it first (its own cell), then:
        view.run()               # or view.run_async() to keep the Stop button live

    ``prompt``: a string (encoded with BOS), chat ``messages`` (the chat template with the generation prompt),
    or token ids. ``attention_layers``: which layers' patterns are captured (default: all; each captured layer
    costs head × T² floats and forces the explicit attention path there). ``generate_kwargs`` go to
    ``model.generate`` (``do_sample``, ``temperature``, ``fwd_hooks``, ...).
    """

    def __init__(self, model: Any, tokenizer: Any, prompt: Any, max_new_tokens: int = 32,
                 attention_layers: Optional[Sequence[int]] = None, top_k: int = 5, target: Any = None,
                 window: int = 48, lens_window: int = 16, **generate_kwargs: Any) -> None:
        for bad in ("on_step", "capture", "stop", "streamer"):
            if bad in generate_kwargs:
                raise ValueError(f"{bad}= is set by GenerationView itself; remove it from the arguments")
        n_layers = model.cfg.n_layers
        layers = list(range(n_layers)) if attention_layers is None else [int(i) for i in attention_layers]
        if not layers or any(not 0 <= i < n_layers for i in layers):
            raise ValueError(f"attention_layers: expected layer indices in [0, {n_layers}), got {attention_layers}")
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, int(max_new_tokens)
        self.generate_kwargs = generate_kwargs
        self.prompt_ids = self._prompt_ids(tokenizer, prompt)
        self.attention_layers = layers
        self.stop_event = threading.Event()
        self.result: Optional[torch.Tensor] = None
        self.error: Optional[BaseException] = None
        self.step_times: list[float] = []                     # seconds spent in on_step, per step
        self._thread: Optional[threading.Thread] = None
        self._names = {f"blocks.{i}.attn.hook_pattern" for i in layers} | set(resid_names(n_layers))

        self.status = W.Label("ready", layout=W.Layout(min_width="260px"))
        self.status.add_class("wb-gen-status")
        self.stop_button = W.Button(description="Stop", icon="stop", button_style="danger", disabled=True,
                                    tooltip="end generation after the current step (run_async)")
        self.stop_button.on_click(lambda _: self.stop())
        self.tokens = TokenView(tokenizer, self.prompt_ids, title="tokens")
        self.attention = AttentionView(tokenizer=tokenizer, window=window)
        self.attention.follow = True
        self.lens = LogitLensView(model, tokenizer, top_k=top_k, target=target, window=lens_window)
        self.lens.follow = True
        self._target_id = self.lens.target
        self._reset()
        self.attention.layer = layers[-1]
        super().__init__([W.HBox([self.status, self.stop_button]), self.tokens, self.attention, self.lens])

    @staticmethod
    def _prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            return resolve_ids(tokenizer, ids, "messages")
        ids = resolve_ids(tokenizer, prompt, "prompt")
        if not ids:
            raise ValueError("prompt: no tokens to start from")
        return ids

    def _reset(self) -> None:
        """Empty views for a new generation (``run()`` may be called again)."""
        self._records = RecordCache(self.tokenizer)
        self.attention._reset_layers(self.attention_layers, self.model.cfg.n_heads)
        self.lens.clear()
        self.tokens.set_ids(self.prompt_ids)

    # ------------------------------------------------------------------------------------------- running
    def run(self) -> torch.Tensor:
        """Generate in this cell, updating the views every step; returns the sequences [1, prompt + new]."""
        self.stop_event.clear()
        self.step_times, self.result, self.error = [], None, None
        self._reset()
        self._set_status("generating…")
        self.stop_button.disabled = False
        ids = torch.tensor([self.prompt_ids], dtype=torch.long, device=self.model.device)
        try:
            out = self.model.generate(ids, max_new_tokens=self.max_new_tokens, capture=self._capture,
                                      on_step=self.on_step, stop=self.stop_event, **self.generate_kwargs)
        except BaseException as e:  # noqa: BLE001 - shown in the view, then re-raised
            self.error = e
            self._set_status(f"error: {type(e).__name__}: {e}")
            raise
        finally:
            self.stop_button.disabled = True
        self.result = out
        n_new = out.shape[1] - len(self.prompt_ids)
        how = "stopped" if self.stop_event.is_set() else "done"
        self._set_status(f"{how}: {n_new} new tokens")
        return out

    def run_async(self) -> threading.Thread:
        """Generate on a background thread (the kernel stays free, so the Stop button works); returns the thread.
        ``view.result`` holds the sequences when it ends (``view.wait()`` joins it)."""
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError("this GenerationView is already generating; call stop() or wait() first")

        def target() -> None:
            try:
                self.run()
            except BaseException:  # noqa: BLE001 - kept in self.error and shown in the status line
                pass

        self._thread = threading.Thread(target=target, name="GenerationView", daemon=True)
        self._thread.start()
        return self._thread

    def wait(self, timeout: Optional[float] = None) -> Optional[torch.Tensor]:
        """Join the ``run_async`` thread; re-raise its error if it failed."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self) -> None:
        """Ask generation to end after the current step (sets the ``stop=`` event)."""
        self.stop_event.set()
        self._set_status("stopping…")

    def _capture(self, name: str) -> bool:
        return name in self._names

    def _set_status(self, text: str) -> None:
        self.status.value = text  # a Label sets textContent: safe for any text

    # ------------------------------------------------------------------------------------------- one step
    def on_step(self, info: Any) -> None:
        """Update every view from one ``StepInfo`` (what ``generate`` calls after the prefill and each token)."""
        start = time.perf_counter()
        seq = info.sequences
        if seq.shape[0] != 1:
            raise ValueError(f"GenerationView shows one sequence; got a batch of {seq.shape[0]}")
        ids = seq[0].tolist()
        records = self._records.update(ids)
        encoded = records_json(records)                       # encoded once, sent by the token and attention views
        positions = info.positions[-1].tolist()
        acts = info.activations
        for layer in self.attention_layers:
            name = f"blocks.{layer}.attn.hook_pattern"
            if name not in acts:
                raise ValueError(f"on_step: {name} was not captured at step {info.step}")
            self.attention.add_rows(layer, acts[name][0], positions)
        top_ids, top_probs, target_probs = lens_step(self.model, acts, self.lens.k, self._target_id)
        self.lens.add_positions(top_ids, top_probs, target_probs, ids)
        with self.tokens.hold_sync():
            self.tokens.text, self.tokens._ids = self._records.text, ids
            self.tokens._set_records(records, encoded)
        self.attention.set_tokens(records, encoded)
        self.lens.set_tokens(records)
        self._set_status(f"step {info.step}: {len(ids) - len(self.prompt_ids)} new tokens")
        self.step_times.append(time.perf_counter() - start)

    # ------------------------------------------------------------------------------------------- snapshot
    def to_html(self, full_page: bool = True) -> str:
        """Static snapshot of all three views and the status line."""
        body = (f"<div class='wb-root wb-snapshot'><div class='wb-gen-status'>{esc(self.status.value)}</div>"
                + self.tokens.to_html(full_page=False) + self.attention.to_html(full_page=False)
                + self.lens.to_html(full_page=False) + "</div>")
        return snapshot_page(body, "GenerationView", full_page)
