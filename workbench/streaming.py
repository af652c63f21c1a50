"""TextStreamer: print decoded text as ``generate`` produces tokens (``generate(..., streamer=...)``).

Example::

    model.generate(ids, streamer=TextStreamer(tok), max_new_tokens=20)
"""

from __future__ import annotations

import torch


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
