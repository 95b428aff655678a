"""What a Ray Serve deployment of loraplex is made of: one validated, frozen config."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from loraplex.errors import ConfigError

ROUTINGS = ("multiplexed", "blind")


@dataclass(frozen=True)
class RayServeConfig:
    """``replicas`` engines, each holding at most ``max_loras_per_replica`` adapters.

    ``adapters`` maps every servable adapter name to its directory; a replica registers one
    only when a request for it arrives (Ray's multiplexed model id). ``routing="blind"``
    drops the model id, leaving Ray's default replica choice (power of two choices on queue
    length): it exists to measure what adapter-aware routing buys. ``engine_args`` go to
    ``LLMEngine.from_args`` unchanged (e.g. ``max_num_seqs``, ``kv_cache_memory_bytes``).
    """

    model: str
    adapters: dict[str, str] = field(default_factory=dict)
    served_model_name: str | None = None
    replicas: int = 1
    num_cpus_per_replica: float = 1.0
    num_gpus_per_replica: float = 0.0
    max_loras_per_replica: int = 8
    max_ongoing_requests: int = 64  # per replica: what Ray lets in at once, for batching
    routing: str = "multiplexed"
    api_key: str | None = None
    engine_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not os.path.isdir(self.model):
            raise ConfigError(f"model {self.model!r} is not a directory")
        for name, path in self.adapters.items():
            if not os.path.isdir(path):
                raise ConfigError(f"adapter {name!r}: {path!r} is not a directory")
        if self.base_name in self.adapters:
            raise ConfigError(f"adapter name {self.base_name!r} equals the served model name")
        for name in ("replicas", "max_loras_per_replica", "max_ongoing_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.num_cpus_per_replica < 0 or self.num_gpus_per_replica < 0:
            raise ConfigError("num_cpus_per_replica and num_gpus_per_replica must be >= 0")
        if self.routing not in ROUTINGS:
            raise ConfigError(f"routing={self.routing!r} must be one of {', '.join(ROUTINGS)}")

    @property
    def base_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.model))
