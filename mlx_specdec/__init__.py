"""mlx-specdec: Gemma 4 with its MTP drafters, speculative decoding in MLX."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from .errors import ConfigError, DrafterMismatchError, InputError, LoadError, ShardError, SpecDecError

if TYPE_CHECKING:
    from .api import GenerationChunk, GenerationResult, generate, generate_batch, load, stream_generate

# The API pulls in mlx-lm, and with it transformers: seconds of imports that
# `mlx-specdec --help` (and any code that only wants the errors) should not pay.
_API = {"GenerationChunk", "GenerationResult", "generate", "generate_batch", "load", "stream_generate"}


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'mlx_specdec' has no attribute {name!r}")


__all__ = [
    "__version__",
    "ConfigError",
    "DrafterMismatchError",
    "GenerationChunk",
    "GenerationResult",
    "InputError",
    "LoadError",
    "ShardError",
    "SpecDecError",
    "generate",
    "generate_batch",
    "load",
    "stream_generate",
]
