"""Checkpoints shipped inside the package, resolvable by name.

``command-r-tiny`` is a 2.8M-parameter Command-R-architecture model (QK-norm, GQA, logit_scale 1/16)
trained on the CPU by ``scripts/train_tiny.py`` on generated chat, fact and repeated-span data; it has
a real induction head, a previous-token head and answers in the Command-R turn format. It sits in the
real Hugging Face layout (config.json, generation_config.json, model.safetensors in float16,
tokenizer.json, tokenizer_config.json with ``default``/``tool_use``/``rag`` templates,
special_tokens_map.json) so every workflow for a real checkpoint can be tried on it first. See its
``MODEL_CARD.md``.

Example::

    >>> from workbench.bundled import resolve_model_path
    >>> resolve_model_path("command-r-tiny")                     # doctest: +ELLIPSIS
    '.../workbench/bundled/command-r-tiny'

``HookedCommandR.from_pretrained`` and ``Tokenizer.from_pretrained`` call ``resolve_model_path``
for a name that is not an existing folder.
"""

from __future__ import annotations

import os

__all__ = ["ALIASES", "BUNDLED_MODELS", "REQUIRED_FILES", "resolve_model_path"]

_HERE = os.path.dirname(os.path.abspath(__file__))

# name -> absolute folder
BUNDLED_MODELS: dict[str, str] = {
    "command-r-tiny": os.path.join(_HERE, "command-r-tiny"),
}
# other spellings accepted for the same folders (a hub-style "owner/name" id, a short name)
ALIASES: dict[str, str] = {
    "commandr-workbench/command-r-tiny": "command-r-tiny",
    "tiny": "command-r-tiny",
}
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def resolve_model_path(name: str | os.PathLike) -> str:
    """Absolute folder of the bundled checkpoint called ``name`` (or one of its aliases).

    Raises ``KeyError`` naming the known models for an unknown name, and ``FileNotFoundError``
    naming the missing file when the bundled folder is incomplete (e.g. a package built without
    its data files).

    Example::

        >>> import os; os.path.isdir(resolve_model_path("command-r-tiny"))
        True
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"bundled model name must be a string, got {type(name).__name__}")
    key = os.fspath(name).strip()
    key = ALIASES.get(key, key)
    if key not in BUNDLED_MODELS:
        known = sorted(BUNDLED_MODELS) + sorted(ALIASES)
        raise KeyError(f"{os.fspath(name)!r} is not a folder or a bundled model name; bundled models: {known}")
    folder = BUNDLED_MODELS[key]
    missing = [f for f in REQUIRED_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"bundled model {key!r} at {folder} is missing {missing}; "
                                f"rebuild it with `python scripts/train_tiny.py --out {folder}`")
    return folder
