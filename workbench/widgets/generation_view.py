"""GenerationView: watch the model generate: the token stream, attention and logit lens, live.

``run()`` calls ``model.generate(..., capture=..., on_step=...)`` in the cell. Every step is stored in Python
(cheap); the browser gets at most one **frame** every ``frame_interval`` seconds (0.1 s) with only what changed:
the new tokens (the token strip is appended to, never re-sent), the attention window and the lens columns on
screen. The page acknowledges each frame once it has drawn it, and at most two frames are in flight (one being
drawn, one travelling; otherwise the next waits up to ``max_frame_wait`` seconds): steps in between are merged
into the next frame, never queued, so the page stays within about one frame of the kernel however fast the model
generates and however slow the browser is. The heatmap and the lens grid, which cost the page far more than a
few new chips, follow at most every ``views_interval`` seconds (0.3 s) during a run.

**Stop during run().** A busy kernel runs widget callbacks only after the cell ends, so a normal button cannot
reach a running loop. The Stop button's messages are also inspected on the kernel's shell-channel thread
(ipykernel ≥ 7 reads every incoming message there before handing it to the busy main thread): a click sets
``stop_event`` at once, and ``generate`` ends after the current step. With a kernel that has no such thread the
button is disabled during ``run()`` and says why (interrupt ■ then ends the run cleanly). ``run_async()``
generates on a background thread; there the button always works. The final status says what happened:
``done``, ``stopped`` (Stop / ``stop()``) or ``interrupted`` (KeyboardInterrupt; ``run()`` then re-raises it,
so a loop of runs stops, with the tokens so far in ``view.result``). No hook stays attached.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import Any, Callable, Optional, Sequence

import ipywidgets as W
import torch

from ..analysis.logit_lens import lens_resid_names
from ..hook_names import act_name
from ._base import RecordCache, resolve_ids
from .attention_view import AttentionView
from .links import link_selection
from .logit_lens_view import LogitLensView
from .snapshot import esc, snapshot_page
from .token_view import TokenView

NO_LIVE_STOP = "Stop can't reach run() on this kernel: use run_async(), or interrupt (■) to end run()"


class GenerationView(W.VBox):
    """Live dashboard for one generation.

    Example::

        from workbench.widgets import GenerationView
        view = GenerationView(model, tok, [{"role": "user", "content": "Hi"}], max_new_tokens=40)
        view                     # display it first (its own cell), then:
        view.run()               # Stop works while it runs; or view.run_async()

    ``prompt``: a string (encoded with BOS), chat ``messages`` (the chat template with the generation prompt),
    or token ids. ``attention_layers``: which layers' patterns are captured (default: all; each captured layer
    costs head × T² floats and forces the explicit attention path there). ``generate_kwargs`` go to
    ``model.generate`` (``do_sample``, ``temperature``, ``fwd_hooks``, ...).
    """

    def __init__(self, model: Any, tokenizer: Any, prompt: Any, max_new_tokens: int = 32,
                 attention_layers: Optional[Sequence[int]] = None, top_k: int = 5, target: Any = None,
                 window: int = 32, lens_window: int = 12, frame_interval: float = 0.1,
                 max_frame_wait: float = 0.5, views_interval: float = 0.3, **generate_kwargs: Any) -> None:
        for bad in ("on_step", "capture", "stop", "streamer"):
            if bad in generate_kwargs:
                raise ValueError(f"{bad}= is set by GenerationView itself; remove it from the arguments")
        n_layers = model.cfg.n_layers
        layers = list(range(n_layers)) if attention_layers is None else [int(i) for i in attention_layers]
        if not layers or any(not 0 <= i < n_layers for i in layers):
            raise ValueError(f"attention_layers: expected layer indices in [0, {n_layers}), got {attention_layers}")
        if frame_interval < 0:
            raise ValueError(f"frame_interval must be >= 0 seconds, got {frame_interval}")
        self.model, self.tokenizer, self.max_new_tokens = model, tokenizer, int(max_new_tokens)
        self.generate_kwargs = generate_kwargs
        self.frame_interval, self.max_frame_wait = float(frame_interval), float(max_frame_wait)
        self.views_interval = float(views_interval)
        self.prompt_ids = self._prompt_ids(tokenizer, prompt)
        self.attention_layers = layers
        self.stop_event = threading.Event()
        self.result: Optional[torch.Tensor] = None
        self.error: Optional[BaseException] = None
        self.outcome = ""                                      # "done" | "stopped" | "interrupted" | "error"
        self.stop_requested_at: Optional[float] = None        # time.time() when Stop reached the kernel
        self.step_times: list[float] = []                     # seconds spent in on_step, per step
        self.frame_times: list[float] = []                    # seconds spent sending each frame
        self.timeline: list[tuple[float, int]] = []           # (time.time(), tokens so far) per step
        self._running = False
        self._thread: Optional[threading.Thread] = None
        self._names = {act_name("pattern", i) for i in layers} | set(lens_resid_names(n_layers))

        self.status = W.Label("ready", layout=W.Layout(min_width="260px"))
        self.status.add_class("wb-gen-status")
        self.stop_button = W.Button(description="Stop", icon="stop", button_style="danger", disabled=True,
                                    tooltip="end generation after the current step")
        self.stop_button.on_click(lambda _: self.stop())
        self.stop_note = W.Label("")
        self.stop_note.add_class("wb-stop-note")
        self.tokens = TokenView(tokenizer, self.prompt_ids, title="tokens")
        self.attention = AttentionView(tokenizer=tokenizer, window=window)
        self.attention.follow = True
        self.lens = LogitLensView(model, tokenizer, top_k=top_k, target=target, window=lens_window)
        self.lens.follow = True
        self._links = link_selection(self.tokens, self.attention, self.lens)
        self._reset()
        self.attention.select(layer=layers[-1])
        self._live_stop = self._route_stop_clicks()
        self._acks = self._watch_frame_acks()
        super().__init__([W.HBox([self.status, self.stop_button, self.stop_note]), self.tokens, self.attention,
                          self.lens])

    @staticmethod
    def _prompt_ids(tokenizer: Any, prompt: Any) -> list[int]:
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            ids = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=True)
            return resolve_ids(tokenizer, ids, "messages")
        ids = resolve_ids(tokenizer, prompt, "prompt")
        if not ids:
            raise ValueError("prompt: no tokens to start from")
        return ids

    def _route_stop_clicks(self) -> bool:
        """Have the kernel's shell-channel thread look at the Stop button's messages as they arrive (ipykernel
        ≥ 7 asks each comm where to route a message; we answer as before and set ``stop_event`` on a click).
        Returns False where the kernel has no such thread (then Stop is disabled during ``run()``)."""
        def on_click(content: dict) -> None:
            if self._running and content.get("event") == "click":
                self.stop_event.set()
                self.stop_requested_at = time.time()

        return _watch_comm(self.stop_button, on_click)

    def _watch_frame_acks(self) -> bool:
        """Read the page's frame acknowledgements (custom message ``{"rendered": n}`` from the token strip) on
        the shell-channel thread, as they arrive, while the main thread generates. False where the kernel has
        no such thread (then frames go out every ``frame_interval``)."""
        def on_ack(content: dict) -> None:
            if isinstance(content.get("rendered"), int):
                self._acked = content["rendered"]

        return _watch_comm(self.tokens, on_ack)

    def _reset(self) -> None:
        """Empty views for a new generation (``run()`` may be called again)."""
        self._records = RecordCache(self.tokenizer)
        self.attention.reset(self.attention_layers, self.model.cfg.n_heads)
        self.lens.clear()
        self.tokens.set_ids(self.prompt_ids)
        self._last_frame = 0.0
        self._pending: Optional[tuple] = None
        self._sent = self._acked = 0
        self._last_status = self._last_views = 0.0
        self._views_changed = 0
        self._views_stale = False
        self._shown: tuple = ([], 0)

    # ------------------------------------------------------------------------------------------- running
    def run(self) -> torch.Tensor:
        """Generate in this cell, updating the views live; returns the sequences [1, prompt + new]."""
        self.stop_event.clear()
        self.stop_requested_at = None
        self.step_times, self.frame_times, self.timeline = [], [], []
        self.result, self.error, self.outcome = None, None, ""
        self._reset()
        on_main = threading.current_thread() is threading.main_thread()
        live = self._live_stop or not on_main                # run_async: the kernel is idle, clicks arrive
        self.stop_button.disabled = not live
        self.stop_note.value = "" if live else NO_LIVE_STOP
        self._set_status("generating…")
        interrupted = threading.Event()
        previous = self._watch_interrupts(interrupted) if on_main else None
        ids = torch.tensor([self.prompt_ids], dtype=torch.long, device=self.model.device)
        self._running = True
        try:
            out = self.model.generate(ids, max_new_tokens=self.max_new_tokens, capture=self._capture,
                                      on_step=self.on_step, stop=self.stop_event, **self.generate_kwargs)
        except KeyboardInterrupt as e:   # hardA: generate re-raises it (GenerationInterrupted, with .tokens)
            self.result, self.outcome = getattr(e, "tokens", None), "interrupted"
            n_new = 0 if self.result is None else self.result.shape[1] - len(self.prompt_ids)
            self._set_status(f"interrupted: {n_new} new tokens")
            self.flush()
            raise                        # the interrupt reaches the caller (a loop of runs stops)
        except BaseException as e:  # noqa: BLE001 - shown in the view, then re-raised
            self.error, self.outcome = e, "error"
            self._set_status(f"error: {type(e).__name__}: {e}")
            raise
        finally:
            self._running = False
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
            self.stop_button.disabled = True
            self.stop_note.value = ""
        self.result = out
        n_new = out.shape[1] - len(self.prompt_ids)
        self.outcome = ("interrupted" if interrupted.is_set() else "stopped" if self.stop_event.is_set()
                        else "done")
        self._set_status(f"{self.outcome}: {n_new} new tokens")     # first: the answer to a Stop click
        self.flush()                                                   # then the last frame
        return out

    @staticmethod
    def _watch_interrupts(flag: threading.Event):
        """Note a SIGINT (the kernel's interrupt) before the usual KeyboardInterrupt, which ``generate``
        re-raises with the tokens so far: so the status can say "interrupted". Returns the previous handler."""
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            flag.set()
            if callable(previous):
                return previous(signum, frame)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)
        return previous

    def run_async(self) -> threading.Thread:
        """Generate on a background thread (the kernel stays free); returns the thread. ``view.result`` holds
        the sequences when it ends (``view.wait()`` joins it)."""
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
        """Ask a running generation to end after the current step (sets the ``stop=`` event). Does nothing
        when nothing runs (a late click can't leave the next run stopped or the status on "stopping…")."""
        if not self._running:
            return
        self.stop_event.set()
        self.stop_requested_at = self.stop_requested_at or time.time()
        self._set_status("stopping…")

    def _capture(self, name: str) -> bool:
        return name in self._names

    def _set_status(self, text: str) -> None:
        self.status.value = text  # a Label sets textContent: safe for any text

    # ------------------------------------------------------------------------------------------- one step
    def on_step(self, info: Any) -> None:
        """Store one ``StepInfo`` (what ``generate`` calls after the prefill and each token); send a frame
        when ``frame_interval`` has passed since the last one."""
        start = time.perf_counter()
        seq = info.sequences
        if seq.shape[0] != 1:
            raise ValueError(f"GenerationView shows one sequence; got a batch of {seq.shape[0]}")
        ids = seq[0].tolist()
        positions = info.positions[-1].tolist()
        acts = info.activations
        for layer in self.attention_layers:
            name = act_name("pattern", layer)
            if name not in acts:
                raise ValueError(f"on_step: {name} was not captured at step {info.step}")
            self.attention.add_rows(layer, acts[name][0], positions)
        self.lens.add_step(acts, ids)
        self._pending = (ids, info.step)
        self.timeline.append((time.time(), len(ids)))
        since = time.perf_counter() - self._last_frame
        # at most two frames in flight: the page is drawing one while the next travels (no queue builds up)
        ready = not self._acks or self._sent - self._acked < 2
        if since >= self.frame_interval and (ready or since >= self.max_frame_wait):
            self.flush()
        self.step_times.append(time.perf_counter() - start)

    def flush(self) -> None:
        """Send one frame with everything stored since the last one (merged)."""
        if self._pending is None and not (self._views_stale and not self._running):
            return
        start = time.perf_counter()
        ids, step = self._pending or self._shown
        self._pending, self._shown = None, (ids, step)
        records = self._records.update(ids)
        changed = self._records.changed_from             # records before it are on the page already
        self._sent += 1
        with self.tokens.hold_sync():
            self.tokens.show_records(records, self._records.text, ids, changed)
            self.tokens.frame = self._sent
            self.tokens.frame_time = time.time()
        # the heatmap and the lens grid cost the page far more than a few new chips: during a run they follow at
        # most every `views_interval` seconds (their stale frames are merged), the last frame always has them
        if not self._running or start - self._last_views >= self.views_interval:
            self.attention.set_tokens(records, self._views_changed, scores=not self._running)
            self.lens.set_tokens(records)
            self._last_views, self._views_changed, self._views_stale = start, len(records), False
        else:
            self._views_changed, self._views_stale = min(self._views_changed, changed), True
        if self._running and (self._last_frame == 0.0 or start - self._last_status >= 0.5 or self.stop_event.is_set()):
            what = "stopping…" if self.stop_event.is_set() else "generating…"
            self._set_status(f"{what} step {step}: {len(ids) - len(self.prompt_ids)} new tokens")
            self._last_status = start
        self._last_frame = time.perf_counter()
        self.frame_times.append(self._last_frame - start)

    # ------------------------------------------------------------------------------------------- snapshot
    def to_html(self, full_page: bool = True) -> str:
        """Static snapshot of all three views and the status line."""
        body = (f"<div class='wb-root wb-snapshot'><div class='wb-gen-status'>{esc(self.status.value)}</div>"
                + self.tokens.to_html(full_page=False) + self.attention.to_html(full_page=False)
                + self.lens.to_html(full_page=False) + "</div>")
        return snapshot_page(body, "GenerationView", full_page)


def _watch_comm(widget: Any, on_content: Callable[[dict], None]) -> bool:
    """Call ``on_content(content)`` on the kernel's shell-channel thread for each message to ``widget``'s comm
    as it arrives (ipykernel ≥ 7 asks each comm where to route a message; the answer stays the comm's own).
    Returns False, and watches nothing, where the kernel has no such thread."""
    comm = getattr(widget, "comm", None)
    kernel = getattr(comm, "kernel", None)
    route: Optional[Callable] = getattr(comm, "_reply_subshell_for", None)
    if route is None or not getattr(kernel, "_supports_kernel_subshells", False) \
            or getattr(kernel, "shell_channel_thread", None) is None:
        return False

    def route_and_watch(data: Any, default: Any) -> Any:
        content = data.get("content") if isinstance(data, dict) else None
        if isinstance(content, dict):
            on_content(content)
        return route(data, default)

    comm._reply_subshell_for = route_and_watch
    return True
