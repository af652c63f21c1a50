"""The tutorial notebooks' first cell as one call: which model, loaded how, with its tokenizer.

Example::

    from workbench import setup_notebook
    model, tok, cfg = setup_notebook()            # $WORKBENCH_MODEL_PATH, else the bundled command-r-tiny
    model, tok, cfg = setup_notebook("/models/c4ai-command-r-v01")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch

from .config import CommandRConfig
from .loading import resolve_model_path
from .model import HookedCommandR
from .tokenizer import Tokenizer

DEFAULT_MODEL = "command-r-tiny"
ENV_VAR = "WORKBENCH_MODEL_PATH"
SMALL_PARAMS = 2e9      # below this, float32 on one device (exact, and fast on a CPU)


@dataclass
class NotebookSetup:
    """What a notebook starts from; unpacks as ``model, tok, cfg``."""

    name: str                  # the model name or folder asked for
    path: str                  # its checkpoint folder
    cfg: CommandRConfig
    small: bool                # fewer than 2B parameters
    model: Optional[HookedCommandR] = None
    tok: Optional[Tokenizer] = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tok, self.cfg))


def setup_notebook(name: Optional[str] = None, seed: int = 0, load: bool = True) -> NotebookSetup:
    """Seed torch, find the model (``name``, else ``$WORKBENCH_MODEL_PATH``, else the bundled
    ``command-r-tiny``) and, with ``load``, load it with its tokenizer: a small model in float32 on
    the CPU, a real checkpoint in its own dtype over the GPUs (``device_map="auto"``).

    Example::

        model, tok, cfg = setup_notebook()
        info = setup_notebook(load=False)         # only the config: info.cfg, info.small, info.path
    """
    name = name or os.environ.get(ENV_VAR) or DEFAULT_MODEL
    torch.manual_seed(seed)
    path = resolve_model_path(name)
    cfg = CommandRConfig.from_pretrained(path)
    setup = NotebookSetup(name=name, path=path, cfg=cfg, small=cfg.n_params < SMALL_PARAMS)
    if load:
        placement = {} if setup.small else {"torch_dtype": "auto", "device_map": "auto"}
        setup.model = HookedCommandR.from_pretrained(name, **placement)
        setup.tok = Tokenizer.from_pretrained(name)
    return setup
