"""loraplex: serve one base LLM with many LoRA adapters in one batch."""

from loraplex.errors import (
    AdapterExistsError,
    AdapterLoadError,
    AdapterNotFoundError,
    CapacityError,
    ConfigError,
    InvalidRequestError,
    LoraplexError,
    ModelLoadError,
)
from loraplex.sampling_params import GuidedParams, SamplingParams

__all__ = [
    "LLM",
    "SamplingParams",
    "GuidedParams",
    "LoraplexError",
    "AdapterExistsError",
    "AdapterLoadError",
    "AdapterNotFoundError",
    "CapacityError",
    "ConfigError",
    "InvalidRequestError",
    "ModelLoadError",
]


def __getattr__(name: str):
    # Import the engine lazily: `import loraplex` stays cheap (CLI, server workers, demo paths).
    if name == "LLM":
        from loraplex.llm import LLM

        return LLM
    raise AttributeError(f"module 'loraplex' has no attribute {name!r}")
