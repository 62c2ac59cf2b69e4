"""Typed errors: each says what was found and what was expected, in one line."""


class SpecDecError(Exception):
    """Base of every error mlx-specdec raises on purpose."""


class LoadError(SpecDecError):
    """A model or drafter could not be found or loaded."""


class ConfigError(LoadError, ValueError):
    """A config.json that does not describe a Gemma 4 model we can run."""


class DrafterMismatchError(LoadError, ValueError):
    """A drafter made for another target."""


class ShardError(ConfigError):
    """A model whose geometry cannot be split over the processes of a group."""


class InputError(SpecDecError, ValueError):
    """A bad prompt or generation option."""
