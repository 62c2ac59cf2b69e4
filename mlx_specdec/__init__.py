"""mlx-specdec: Gemma 4 with its MTP drafters, speculative decoding in MLX."""

from .api import GenerationChunk, GenerationResult, generate, generate_batch, load, stream_generate
from .errors import ConfigError, DrafterMismatchError, InputError, LoadError, SpecDecError

__all__ = [
    "ConfigError",
    "DrafterMismatchError",
    "GenerationChunk",
    "GenerationResult",
    "InputError",
    "LoadError",
    "SpecDecError",
    "generate",
    "generate_batch",
    "load",
    "stream_generate",
]
