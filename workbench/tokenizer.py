"""Command-R tokenizer and chat templates, without transformers.

Wraps the ``tokenizers`` library (byte-level BPE from ``tokenizer.json``) and renders the chat templates of
``tokenizer_config.json`` in the sandbox of ``workbench.chat_templates`` (set up like transformers'), so
prompts and ids match ``AutoTokenizer`` for the same files. Facts this relies on (Cohere's tokenizer files
and transformers' ``CohereTokenizerFast``): NFC normalisation, individual digits, GPT-2 byte-level
pre-tokenisation, BOS prepended and no EOS, added tokens matched in raw text, left padding, no clean-up of
spaces when decoding.

    >>> tok = Tokenizer.from_pretrained("path/to/command-r")           # doctest: +SKIP
    >>> tok.encode("Hello this is a test")                             # doctest: +SKIP
    [5, 28339, 2075, 1801, 1671, 3282]
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, processors
from tokenizers import Tokenizer as _Backend

from .bundled import resolve_model_path
from .chat_templates import (ChatTemplateError, UnsafeTemplateError, normalize_messages, plain_template_data,
                             render_template)
from .control_tokens import mark_control_text, split_marked
from .token_pieces import TokenPiece, readable, utf8_segments

__all__ = ["BatchEncoding", "ChatTemplateError", "TokenPiece", "Tokenizer", "UnsafeTemplateError"]

# Named special tokens in transformers' order (this order is what `all_special_ids` lists), with
# CohereTokenizer's class defaults, which apply when tokenizer_config.json does not mention the key.
_SPECIAL_DEFAULTS = {
    "bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>", "unk_token": "<UNK>", "sep_token": "<SEP>",
    "pad_token": "<PAD>", "cls_token": "<CLS>", "mask_token": "<MASK_TOKEN>",
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by the ByteLevel pre-tokenizer (space -> 'Ġ', '\\n' -> 'Ċ')."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b], shift = chr(256 + shift), shift + 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class BatchEncoding(dict):
    """``dict`` of ``input_ids`` and ``attention_mask`` that also allows ``enc.input_ids`` and ``enc.to(device)``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: Any) -> BatchEncoding:
        return BatchEncoding({k: v.to(device) if hasattr(v, "to") else v for k, v in self.items()})


def _id_list(ids: Any) -> list[int]:
    if hasattr(ids, "tolist"):  # torch / numpy
        ids = ids.tolist()
    if isinstance(ids, int):
        return [ids]
    ids = list(ids)
    if any(isinstance(i, (list, tuple)) for i in ids):
        raise ValueError("expected one sequence of token ids, got a batch; use batch_decode for 2-D input")
    return [int(i) for i in ids]


def _token_content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"could not parse {path}: {e}") from e


class _Special:
    """Descriptor: ``tok.bos_token`` (a string or None) and, with ``as_id``, ``tok.bos_token_id``."""

    def __init__(self, key: str, as_id: bool = False) -> None:
        self.key, self.as_id = key, as_id

    def __get__(self, obj: Tokenizer | None, owner: type) -> Any:
        if obj is None:
            return self
        token = obj.special_tokens_map.get(self.key)
        return obj.convert_tokens_to_ids(token) if (self.as_id and token is not None) else token


class Tokenizer:
    """Command-R tokenizer: encode/decode, left padding, display pieces and sandboxed chat templates.

    >>> tok = Tokenizer.from_pretrained("path/to/command-r")                     # doctest: +SKIP
    >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
    ...                         return_tensors="pt").shape                       # doctest: +SKIP
    torch.Size([1, 7])
    """

    bos_token, eos_token, unk_token = _Special("bos_token"), _Special("eos_token"), _Special("unk_token")
    sep_token, pad_token, cls_token = _Special("sep_token"), _Special("pad_token"), _Special("cls_token")
    mask_token = _Special("mask_token")
    bos_token_id, eos_token_id = _Special("bos_token", True), _Special("eos_token", True)
    unk_token_id, sep_token_id = _Special("unk_token", True), _Special("sep_token", True)
    pad_token_id, cls_token_id = _Special("pad_token", True), _Special("cls_token", True)
    mask_token_id = _Special("mask_token", True)

    def __init__(self, backend: _Backend, config: Mapping[str, Any] | None = None,
                 special_tokens_file: Mapping[str, Any] | None = None,
                 chat_templates: Mapping[str, str] | None = None, name_or_path: str = "") -> None:
        config = dict(config or {})
        self._tk, self.name_or_path = backend, name_or_path
        self.padding_side: str = config.get("padding_side", "left")
        self.chat_templates: dict[str, str] = (dict(chat_templates) if chat_templates is not None
                                               else _parse_templates(config.get("chat_template")))
        # special_tokens_map.json is legacy: transformers lets it override the config only without added_tokens_decoder.
        overrides = {} if "added_tokens_decoder" in config else dict(special_tokens_file or {})
        self.special_tokens_map: dict[str, str] = {}
        for key, default in _SPECIAL_DEFAULTS.items():
            if key in overrides or key in config:
                value = _token_content(overrides[key] if key in overrides else config[key])
            else:
                value = default if backend.token_to_id(default) is not None else None
            if value is not None:
                self.special_tokens_map[key] = value
        extra = overrides.get("additional_special_tokens") or config.get("additional_special_tokens") \
            or config.get("extra_special_tokens") or []
        if isinstance(extra, Mapping):  # transformers 5 also allows {"image_token": "<img>", ...}
            extra = list(extra.values())
        self.additional_special_tokens: list[str] = [_token_content(t) for t in extra]
        missing = [t for t in (*self.special_tokens_map.values(), *self.additional_special_tokens)
                   if backend.token_to_id(t) is None]
        if missing:  # transformers adds named special tokens that the vocabulary lacks
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        added = backend.get_added_tokens_decoder()
        self._added: dict[int, str] = {i: t.content for i, t in added.items()}
        # Which added tokens `decode(skip_special_tokens=True)` drops: tokenizer.json's flags, overridden by
        # tokenizer_config.json's added_tokens_decoder (transformers pushes those flags into the backend).
        self._skip_ids = {i for i, t in added.items() if t.special}
        for key, spec in (config.get("added_tokens_decoder") or {}).items():
            if self._added.get(int(key)) != spec.get("content"):
                continue
            if spec.get("special"):
                self._skip_ids.add(int(key))
            else:
                self._skip_ids.discard(int(key))
        if "add_bos_token" in config or "add_eos_token" in config:
            self._set_post_processor(bool(config.get("add_bos_token")), bool(config.get("add_eos_token")))

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self.bos_token if add_bos else None, self.eos_token if add_eos else None
        single = " ".join(p for p in (bos and f"{bos}:0", "$A:0", eos and f"{eos}:0") if p)
        pair = " ".join(p for p in (single, bos and f"{bos}:1", "$B:1", eos and f"{eos}:1") if p)
        specials = [(t, self.convert_tokens_to_ids(t)) for t in (bos, eos) if t]
        self._tk.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a folder (``tokenizer.json`` or ``.json.gz``; optional ``tokenizer_config.json``,
        ``special_tokens_map.json``, ``chat_template.jinja``) or a bundled name.

        >>> tok = Tokenizer.from_pretrained("command-r-tiny")                     # doctest: +SKIP
        """
        folder = Path(path).expanduser()
        if not folder.is_dir():
            folder = _resolve_named(path)
        file = next((f for f in (folder / "tokenizer.json", folder / "tokenizer.json.gz") if f.is_file()), None)
        if file is None:
            raise FileNotFoundError(f"no tokenizer.json (or tokenizer.json.gz) in {folder}")
        try:
            raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
            backend = _Backend.from_str(raw.decode("utf-8"))
        except Exception as e:  # noqa: BLE001 - the Rust error types are not importable
            raise ValueError(f"could not load {file}: {e}") from e
        config = _read_json(folder / "tokenizer_config.json")
        return cls(backend, config, _read_json(folder / "special_tokens_map.json"), _template_files(folder),
                   str(folder))

    def __len__(self) -> int:
        return self._tk.get_vocab_size(with_added_tokens=True)

    @property
    def vocab_size(self) -> int:
        """Number of token ids including added tokens (255029 for Command-R; the model's embedding has 256000 rows).
        Note: transformers' ``vocab_size`` excludes added tokens; ``len()`` is the same in both."""
        return len(self)

    @property
    def all_special_tokens(self) -> list[str]:
        """Named special tokens (bos, eos, unk, sep, pad, cls, mask) then additional ones, as in transformers."""
        tokens = [*self.special_tokens_map.values(), *self.additional_special_tokens]
        return list(dict.fromkeys(tokens))

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    @property
    def added_tokens(self) -> dict[int, str]:
        """Control tokens matched in raw text before normalisation (ids 0-7 and 255000+ for Command-R)."""
        return dict(self._added)

    def get_vocab(self) -> dict[str, int]:
        return self._tk.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        """Raw vocabulary strings (``'Ġthis'``); None for ids outside the vocabulary."""
        if isinstance(ids, int):
            return self._tk.id_to_token(ids)
        return [self._tk.id_to_token(i) for i in _id_list(ids)]

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Ids of vocabulary strings; unknown strings give ``unk_token_id`` (None for Command-R, which sets no unk)."""
        if isinstance(tokens, str):
            found = self._tk.token_to_id(tokens)
            return found if found is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` prepends ``<BOS_TOKEN>``.

        >>> tok.encode("Hello this is a test")                                   # doctest: +SKIP
        [5, 28339, 2075, 1801, 1671, 3282]
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, text: str | Sequence[str], padding: bool = True, add_special_tokens: bool = True,
                 return_tensors: str | None = None) -> BatchEncoding:
        """Encode one text or a batch. Batches are padded on ``padding_side`` (left by default) with the pad id.

        A single string gives flat lists (or ``[1, n]`` tensors with ``return_tensors="pt"``).

        >>> tok(["Hi", "Hello there"], return_tensors="pt").attention_mask       # doctest: +SKIP
        tensor([[0, 1, 1],
                [1, 1, 1]])
        """
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a str or a list of str")
        ids = [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=add_special_tokens)]
        return self._batch(ids, single, padding, return_tensors)

    def _batch(self, ids: list[list[int]], single: bool, padding: bool, return_tensors: str | None) -> BatchEncoding:
        masks = [[1] * len(seq) for seq in ids]
        longest = max((len(seq) for seq in ids), default=0)
        if padding and any(len(seq) != longest for seq in ids):
            if self.pad_token_id is None:
                raise ValueError("this tokenizer has no pad token, so a batch of different lengths cannot be padded")
            if self.padding_side not in ("left", "right"):
                raise ValueError(f"padding_side must be 'left' or 'right', got {self.padding_side!r}")
            left = self.padding_side == "left"
            for i, seq in enumerate(ids):
                n = longest - len(seq)
                pads, zeros = [self.pad_token_id] * n, [0] * n
                ids[i], masks[i] = (pads + seq, zeros + masks[i]) if left else (seq + pads, masks[i] + zeros)
        if return_tensors is None:
            return BatchEncoding(input_ids=ids[0] if single else ids, attention_mask=masks[0] if single else masks)
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        if any(len(seq) != longest for seq in ids):
            raise ValueError("sequences have different lengths; pass padding=True to get a tensor")

        return BatchEncoding(input_ids=torch.tensor(ids, dtype=torch.long).reshape(len(ids), longest),
                             attention_mask=torch.tensor(masks, dtype=torch.long).reshape(len(ids), longest))

    def decode(self, ids: Any, skip_special_tokens: bool = False, errors: str = "strict") -> str:
        """Text of a list / 1-D tensor of ids. Spaces are never cleaned up; incomplete UTF-8 decodes to U+FFFD.

        ``skip_special_tokens`` drops the added tokens flagged special (tokenizer.json's flags, overridden by
        tokenizer_config.json's ``added_tokens_decoder``), exactly as transformers does. Ids outside the
        vocabulary (e.g. the untrained embedding rows 255029..255999 of Command-R) raise with ``errors="strict"``;
        ``errors="replace"`` writes U+FFFD for each, ``errors="ignore"`` drops them (what ``tokenizers`` does).

        >>> tok.decode([28339, 255500], errors="replace")                       # doctest: +SKIP
        'Hello\ufffd'
        """
        if errors not in ("strict", "replace", "ignore"):
            raise ValueError(f"errors must be 'strict', 'replace' or 'ignore', got {errors!r}")
        id_list = _id_list(ids)
        size = len(self)
        outside = [i for i in id_list if not 0 <= i < size]
        if outside and errors == "strict":
            raise ValueError(f"decode: token id(s) {sorted(set(outside))[:10]} are outside the tokenizer's vocabulary "
                             f"[0, {size}); pass errors='replace' or errors='ignore' to decode anyway")
        if outside and errors == "replace":
            parts = [[]]
            for i in id_list:
                parts.append([]) if not 0 <= i < size else parts[-1].append(i)
            return "\ufffd".join(self.decode(p, skip_special_tokens) for p in parts)
        id_list = [i for i in id_list if 0 <= i < size]
        if skip_special_tokens:
            id_list = [i for i in id_list if i not in self._skip_ids]
        return self._tk.decode(id_list, skip_special_tokens=False)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False, errors: str = "strict") -> list[str]:
        """``decode`` for each row of a list of lists or a 2-D tensor."""
        rows = sequences.tolist() if hasattr(sequences, "tolist") else sequences
        return [self.decode(row, skip_special_tokens=skip_special_tokens, errors=errors) for row in rows]

    def token_pieces(self, ids: Any) -> list[TokenPiece]:
        """Per-token bytes, readable text and character spans, for widgets.

        Concatenating ``piece.bytes`` and decoding UTF-8 (with ``errors="replace"``) gives ``decode(ids)``.
        When a character's bytes are split over tokens, every one of those tokens' spans covers the character.

        >>> [p.text for p in tok.token_pieces(tok.encode(" 똠", add_special_tokens=False))]  # doctest: +SKIP
        ['·<0xEB><0x98>', '<0xA0>']
        """
        id_list = _id_list(ids)
        raw: list[tuple[str | None, bytes, bool]] = []
        for i in id_list:
            token = self._tk.id_to_token(i) if i >= 0 else None
            if i in self._added:
                raw.append((token, self._added[i].encode("utf-8"), True))
            elif token is None:
                raw.append((None, b"", False))  # e.g. the untrained rows 255029..255999 of a 256000-row embedding
            else:
                try:
                    raw.append((token, bytes(_UNICODE_TO_BYTE[c] for c in token), False))
                except KeyError:  # not byte-level (cannot happen for Cohere's vocab); tokenizers uses the UTF-8
                    raw.append((token, token.encode("utf-8"), False))
        # Map every byte of the whole sequence to the index of the character it decodes into.
        char_of_byte: list[int] = []
        n_chars = 0
        for chunk, text in utf8_segments(b"".join(data for _, data, _ in raw)):
            if text is None:  # one U+FFFD for the whole ill-formed run
                char_of_byte += [n_chars] * len(chunk)
                n_chars += 1
                continue
            for ch in text:
                char_of_byte += [n_chars] * len(ch.encode("utf-8"))
                n_chars += 1
        pieces, offset = [], 0
        for i, (token, data, special) in zip(id_list, raw):
            if data:
                span = (char_of_byte[offset], char_of_byte[offset + len(data) - 1] + 1)
            else:
                pos = char_of_byte[offset] if offset < len(char_of_byte) else n_chars
                span = (pos, pos)
            text = self._added[i] if special else (readable(data) if token is not None else f"<unused:{i}>")
            pieces.append(TokenPiece(i, token, data, text, special, span))
            offset += len(data)
        return pieces

    @property
    def template_names(self) -> list[str]:
        return sorted(self.chat_templates)

    def get_chat_template(self, chat_template: str | None = None, tools: Sequence[Any] | None = None) -> str:
        """Template source chosen like transformers: a known name, else a Jinja string; with no argument,
        ``"tool_use"`` when ``tools`` are given and it exists, else ``"default"``. Documents do not select "rag"
        (transformers does not either): ask for it by name, or use ``apply_grounded_generation_template``."""
        if chat_template is not None:
            if chat_template in self.chat_templates:
                return self.chat_templates[chat_template]
            if "{" in chat_template:  # a template string, not a name
                return chat_template
            raise ValueError(f"unknown chat template name {chat_template!r}; available: {self.template_names}")
        if tools is not None and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if not self.chat_templates:
            raise ValueError(f"no chat template in {self.name_or_path or 'this tokenizer'} (tokenizer_config.json has "
                             "no chat_template); pass chat_template=<jinja string>")
        raise ValueError(f"no 'default' chat template; pass chat_template= one of {self.template_names}")

    def apply_chat_template(self, messages: Sequence[Any], tools: Sequence[dict] | None = None,
                            documents: Sequence[dict] | None = None, chat_template: str | None = None,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            return_tensors: str | None = None, return_dict: bool = False, padding: bool = True,
                            escape_special_tokens: bool = False, **template_kwargs: Any) -> Any:
        """Render a conversation (or a list of conversations) with a chat template, optionally tokenized.

        ``chat_template`` is a name ("default", "tool_use", "rag") or a Jinja string; extra keyword arguments
        (e.g. ``citation_mode="fast"``) are template variables. Tokenizing uses ``add_special_tokens=False``,
        because the template writes ``<BOS_TOKEN>`` itself. Returns the string (``tokenize=False``), ids
        (``list[int]``, or a ``[1, n]`` LongTensor with ``return_tensors="pt"``) or, with ``return_dict``, a
        ``BatchEncoding`` with ``input_ids`` and ``attention_mask``.

        ``escape_special_tokens=True`` treats message fields (all but ``role``), tools and documents as untrusted:
        control-token text in them (``<|END_OF_TURN_TOKEN|>`` ...) is tokenized as plain text instead of becoming
        the control token (the default, as transformers, lets it through). Every other id is unchanged. Needs
        ``tokenize=True`` (a string cannot carry the difference).

        >>> tok.apply_chat_template([{"role": "user", "content": "Hello, how are you?"}],
        ...                         add_generation_prompt=True, tokenize=False)  # doctest: +SKIP
        '<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello, how are you?<|END_OF_TURN_TOKEN|><|START_OF_TURN_...'
        """
        source = self.get_chat_template(chat_template, tools)
        if isinstance(messages, (str, bytes)) or not messages:
            raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
        batched = isinstance(messages[0], (list, tuple))
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise TypeError("tools must be JSON-schema dicts (Command-R: name, description, parameter_definitions); "
                            "convert Python functions with transformers.utils.get_json_schema first")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise TypeError("documents must be a list of dicts, e.g. {'title': ..., 'text': ...}")
        if escape_special_tokens and not tokenize:
            raise ValueError("escape_special_tokens=True needs tokenize=True: the rendered string cannot show which "
                             "control-token text is plain")
        specials = list(self._added.values()) if escape_special_tokens else []
        mark = lambda v, skip=(): mark_control_text(v, specials, skip)  # noqa: E731 - identity when not escaping
        shared = plain_template_data({**self.special_tokens_map, **template_kwargs})  # kwargs win over special tokens
        shared.update(tools=mark(plain_template_data(tools)), documents=mark(plain_template_data(documents)),
                      add_generation_prompt=add_generation_prompt)
        rendered = [render_template(source, {**shared, "messages": mark(normalize_messages(conversation), ("role",))})
                    for conversation in (messages if batched else [messages])]
        if not tokenize:
            return rendered if batched else rendered[0]
        ids = ([self._encode_marked(text, specials) for text in rendered] if specials else
               [e.ids for e in self._tk.encode_batch(rendered, add_special_tokens=False)])
        out = self._batch(ids, not batched, padding, return_tensors)
        return out if return_dict else out["input_ids"]

    def _encode_marked(self, text: str, specials: list[str]) -> list[int]:
        """Ids of a rendered prompt whose markers stand for control-token text: that text is encoded piece by
        piece (the pre-tokenizer's pieces, so no piece is an added token), the rest as usual."""
        ids: list[int] = []
        for plain, special in split_marked(text, specials):
            if special is None:
                ids += self._tk.encode(plain, add_special_tokens=False).ids
                continue
            cuts = [o for _, o in self._tk.pre_tokenizer.pre_tokenize_str(special)] if self._tk.pre_tokenizer else []
            part = [i for a, b in cuts for i in self._tk.encode(special[a:b], add_special_tokens=False).ids]
            if not cuts or any(i in self._added for i in part):        # fall back to one character at a time
                part = [i for ch in special for i in self._tk.encode(ch, add_special_tokens=False).ids]
            ids += part
        return ids

    def apply_tool_use_template(self, messages: Sequence[Any], tools: Sequence[dict], **kwargs: Any) -> Any:
        """Command-R tool-use prompt (transformers' ``CohereTokenizer.apply_tool_use_template``)."""
        return self.apply_chat_template(messages, tools=tools, chat_template="tool_use", **kwargs)

    def apply_grounded_generation_template(self, messages: Sequence[Any], documents: Sequence[dict],
                                           citation_mode: str = "accurate", **kwargs: Any) -> Any:
        """Command-R RAG prompt, ``citation_mode`` "accurate" (default, as transformers) or "fast"."""
        return self.apply_chat_template(messages, documents=documents, chat_template="rag",
                                        citation_mode=citation_mode, **kwargs)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name_or_path!r}, vocab={len(self)}, padding_side={self.padding_side!r}, "
                f"templates={self.template_names})")


def _resolve_named(path: str | os.PathLike) -> Path:
    """A name that is not a folder goes through ``workbench.bundled.resolve_model_path``."""
    try:
        folder = Path(resolve_model_path(str(path)))
    except Exception as e:  # noqa: BLE001 - whatever the resolver raises for an unknown name; chained below
        raise FileNotFoundError(f"tokenizer folder not found: {str(path)!r} is not a folder, and the bundled-model "
                                f"lookup failed: {e}") from e
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {str(path)!r} resolved to {folder}")
    return folder


def _template_files(folder: Path) -> dict[str, str] | None:
    """``chat_template.jinja`` + ``additional_chat_templates/*.jinja``; when present they win over the config's
    ``chat_template``, as in transformers. None when there are none."""
    files = {}
    if (folder / "chat_template.jinja").is_file():
        files["default"] = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for file in sorted((folder / "additional_chat_templates").glob("*.jinja")):
        files[file.name.removesuffix(".jinja")] = file.read_text(encoding="utf-8")
    return files or None


def _parse_templates(raw: Any) -> dict[str, str]:
    """tokenizer_config.json's ``chat_template``: a string (named "default"), or a list of {name, template}."""
    if raw is None:
        return {}
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, Mapping):
        return {str(k): str(v) for k, v in raw.items()}
    if isinstance(raw, list) and all(isinstance(t, Mapping) and {"name", "template"} <= t.keys() for t in raw):
        return {t["name"]: t["template"] for t in raw}
    raise ValueError("tokenizer_config.json: chat_template must be a string or a list of {'name', 'template'} dicts")
