"""commandr-workbench: a hookable, einops re-implementation of Cohere's Command-R family.

Example::

    from workbench import HookedCommandR, Tokenizer
    model = HookedCommandR.from_pretrained("command-r-tiny")      # or a real checkpoint folder
    tok = Tokenizer.from_pretrained("command-r-tiny")
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}],
                                  add_generation_prompt=True, return_tensors="pt")
    logits, cache = model.run_with_cache(ids)
"""

from .activation_cache import ActivationCache, CacheMismatchError
from .config import CommandRConfig, ConfigError
from .hook_points import HookContext, HookError, HookPoint, StopForward
from .model import HookedCommandR

# Heavier or optional parts load on first use (module name, attribute).
_LAZY = {
    "Tokenizer": ("tokenizer", "Tokenizer"),
    "KVCache": ("kv_cache", "KVCache"),
    "generate_text": ("generation", "generate_text"),
    "TextStreamer": ("generation", "TextStreamer"),
    "estimate_memory": ("memory", "estimate_memory"),
    "QuantizationConfig": ("quantization", "QuantizationConfig"),
    "format_hook_table": ("hook_table", "format_hook_table"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{module}", __name__), attr)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")


__all__ = [
    "ActivationCache", "CacheMismatchError", "CommandRConfig", "ConfigError", "HookContext", "HookError", "HookPoint",
    "HookedCommandR", "StopForward", *_LAZY,
]
__version__ = "0.1.0"
