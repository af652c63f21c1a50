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
from .generation import GenerationInterrupted, TextStreamer, generate_text
from .hook_names import act_name, get_act_name
from .hook_points import HookContext, HookError, HookPoint, StopForward
from .hook_table import format_hook_table
from .kv_cache import KVCache
from .memory import estimate_memory
from .model import HookedCommandR
from .notebook_setup import setup_notebook
from .quantization import QuantizationConfig
from .tokenizer import Tokenizer

__all__ = [
    "ActivationCache", "CacheMismatchError", "CommandRConfig", "ConfigError", "GenerationInterrupted", "HookContext", "HookError", "HookPoint",
    "HookedCommandR", "KVCache", "QuantizationConfig", "StopForward", "TextStreamer", "Tokenizer", "act_name",
    "estimate_memory", "format_hook_table", "generate_text", "get_act_name", "setup_notebook",
]
__version__ = "0.1.0"
