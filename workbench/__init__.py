"""commandr-workbench: a hookable, einops re-implementation of Cohere's Command-R family."""

from .activation_cache import ActivationCache
from .config import CommandRConfig, ConfigError
from .hook_points import HookContext, HookError, HookPoint, StopForward
from .model import HookedCommandR

__all__ = [
    "ActivationCache", "CommandRConfig", "ConfigError", "HookContext", "HookError", "HookPoint",
    "HookedCommandR", "StopForward",
]
__version__ = "0.1.0"
