"""Typed errors a user can cause. Each message names the file, field or value at fault."""


class LoraplexError(Exception):
    """Base class of every error loraplex raises on purpose."""


class InvalidRequestError(LoraplexError, ValueError):
    """A request the engine cannot serve as given (prompt too long, bad parameters)."""


class AdapterNotFoundError(LoraplexError, KeyError):
    """A request or call named an adapter that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class AdapterExistsError(InvalidRequestError):
    """A load named an adapter that is already registered (unload it first)."""


class AdapterLoadError(LoraplexError):
    """An adapter directory is missing, malformed or does not fit the base model."""


class ModelLoadError(LoraplexError):
    """A base-model checkpoint is missing, malformed or of an unsupported architecture."""


class CapacityError(LoraplexError):
    """A request can never fit (e.g. needs more KV blocks than the cache has)."""


class ConfigError(LoraplexError, ValueError):
    """An engine argument is out of range (e.g. ``max_model_len=0``); names the argument."""


class ConfigTypeError(ConfigError, TypeError):
    """An engine argument has the wrong type (a bool or str for an int, a list for a dict)."""


class DeviceError(LoraplexError, RuntimeError):
    """The requested device is not available in this torch build or on this machine."""


class TensorParallelError(LoraplexError, RuntimeError):
    """A tensor-parallel worker died or a collective failed: the engine has shut down."""
