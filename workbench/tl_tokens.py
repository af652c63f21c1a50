"""TransformerLens' tokenization helpers on HookedCommandR (a mixin): ``model.tokenizer``,
``to_tokens``, ``to_str_tokens``, ``to_string``, ``to_single_token``, ``get_token_position``.

Command-R's tokenizer is used without any chat template, with ``<BOS_TOKEN>`` first unless
``prepend_bos=False`` (TL's ``default_prepend_bos``). Lists of strings are padded on the right by
default, as TL does (``padding_side="left"`` on request); the padding id is the tokenizer's.

Example::

    model.to_tokens("The capital of France is")         # tensor([[5, 303, 346, 297, 1175, 272]])
    model.to_str_tokens("The capital")                   # ['<BOS_TOKEN>', 'The', ' capital']
    model.to_single_token(" Paris")                      # 1328
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from .tokenizer import Tokenizer


class TLTokensMixin:
    """Tokenization helpers with TransformerLens' names and semantics."""

    @property
    def tokenizer(self) -> Optional[Tokenizer]:
        """The checkpoint's tokenizer (loaded on first use from the folder the model came from), or
        whatever was assigned; None when the model has no folder with a tokenizer.json."""
        tok = self.__dict__.get("_tl_tokenizer")
        if tok is None:
            path = getattr(self, "name_or_path", None)
            if path and os.path.isfile(os.path.join(path, "tokenizer.json")):
                tok = Tokenizer.from_pretrained(path)
                self.__dict__["_tl_tokenizer"] = tok
        return tok

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self.__dict__["_tl_tokenizer"] = value

    def _need_tokenizer(self, what: str) -> Tokenizer:
        tok = self.tokenizer
        if tok is None:
            raise ValueError(f"{what} needs a tokenizer: load the model by name or folder, or set "
                             "model.tokenizer = Tokenizer.from_pretrained(path)")
        return tok

    def tokenize_batch(self, texts: list, prepend_bos: Optional[bool], padding_side: Optional[str]):
        """Token ids [batch pos] and attention mask of ``texts``, padded on ``padding_side``."""
        tok = self._need_tokenizer("tokenizing a string")
        bos = self.cfg.default_prepend_bos if prepend_bos is None else bool(prepend_bos)
        side = padding_side or self.cfg.default_padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {side!r}")
        rows = [tok.encode(t, add_special_tokens=bos) for t in texts]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else self.cfg.pad_token_id
        if any(len(r) != width for r in rows) and pad is None:
            raise ValueError("strings of different lengths need a pad token; the tokenizer has none")
        ids = torch.full((len(rows), width), pad if pad is not None else 0, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, cols] = torch.tensor(r, dtype=torch.long)
            mask[i, cols] = 1
        return ids, mask

    def to_tokens(self, input, prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None,
                  move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
        """A string or list of strings -> token ids ``[batch pos]`` (BOS first unless ``prepend_bos=False``;
        a list is padded on ``padding_side``, right by default as in TL). ``truncate`` cuts to ``cfg.n_ctx``.

        Example::

            model.to_tokens(["Hi", "Hello there"]).shape           # [2 pos]
        """
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("to_tokens: expected a str or a non-empty list of str")
        ids, _ = self.tokenize_batch(texts, prepend_bos, padding_side)
        if truncate:
            ids = ids[:, : self.cfg.n_ctx]
        return ids.to(self.device) if move_to_device else ids

    def to_str_tokens(self, input, prepend_bos: Optional[bool] = None, padding_side: Optional[str] = None):
        """Each token as its text: a string, ids [pos] or [1 pos] -> list of str; a list of strings
        or ids [batch pos] -> list of lists. Special tokens keep their names (``'<BOS_TOKEN>'``).

        Example::

            model.to_str_tokens("The capital")        # ['<BOS_TOKEN>', 'The', ' capital']
        """
        tok = self._need_tokenizer("to_str_tokens")
        if isinstance(input, str):
            return [tok.decode([i]) for i in self.to_tokens(input, prepend_bos, padding_side)[0].tolist()]
        if isinstance(input, (list, tuple)) and input and all(isinstance(t, str) for t in input):
            return [self.to_str_tokens(t, prepend_bos, padding_side) for t in input]
        ids = torch.as_tensor(input)
        if ids.dim() == 2 and ids.shape[0] > 1:          # (TL refuses a batch; we give one list per row)
            return [self.to_str_tokens(row) for row in ids]
        if ids.dim() > 2:
            raise ValueError(f"to_str_tokens: expected a str, a list of str, or ids [pos] / [batch pos], got {tuple(ids.shape)}")
        return [tok.decode([i]) for i in ids.reshape(-1).tolist()]

    def to_string(self, tokens, errors: str = "strict") -> Union[str, list]:
        """Ids -> text: [pos] or a list of ints -> str, [batch pos] -> list of str (special tokens kept).
        An id the tokenizer lacks (an untrained embedding row past its vocabulary) raises unless
        ``errors="replace"`` (U+FFFD for each) or ``"ignore"``."""
        tok = self._need_tokenizer("to_string")
        ids = torch.as_tensor(tokens)
        if ids.dim() == 2:
            return [tok.decode(row.tolist(), errors=errors) for row in ids]
        return tok.decode(ids.reshape(-1).tolist(), errors=errors)

    def to_single_token(self, string: str) -> int:
        """The id of a string that is exactly one token (no BOS); raises naming the pieces otherwise."""
        ids = self.to_tokens(string, prepend_bos=False, move_to_device=False)[0]
        if ids.numel() != 1:
            raise ValueError(f"to_single_token: {string!r} is {ids.numel()} tokens "
                             f"{self.to_str_tokens(ids)}, not one")
        return int(ids[0])

    def to_single_str_token(self, int_token: int) -> str:
        return self.to_str_tokens(torch.tensor([int(int_token)]))[0]

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos: Optional[bool] = None,
                           padding_side: Optional[str] = None) -> int:
        """Index of ``single_token`` (a str of one token, or an id) in ``input`` (a str, or ids of one
        sequence); ``mode`` "first" or "last". Raises if it does not occur."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode: expected 'first' or 'last', got {mode!r}")
        tokens = self.to_tokens(input, prepend_bos, padding_side) if isinstance(input, str) else torch.as_tensor(input)
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"get_token_position: expected one sequence, got a batch of {tokens.shape[0]}")
            tokens = tokens[0]
        token = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        hits = (tokens == token).nonzero().flatten()
        if hits.numel() == 0:
            raise ValueError(f"get_token_position: token {token} ({self.to_single_str_token(token)!r}) is not in the input")
        return int(hits[0] if mode == "first" else hits[-1])

