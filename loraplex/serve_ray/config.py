"""What a Ray Serve deployment of loraplex is made of: one validated, frozen config, and the
``loraplex serve-ray`` flags that map onto it (this module does not import Ray, so the CLI
can list the flags without it)."""

from __future__ import annotations

import argparse
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


def add_serve_ray_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Define the ``loraplex serve-ray`` flags on ``p``."""
    p.add_argument("--model", required=True, help="Hugging Face model directory (base model)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="register a PEFT adapter directory under NAME (repeatable); replicas "
                        "load it when a request needs it")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--num-cpus-per-replica", type=float, default=1.0)
    p.add_argument("--num-gpus-per-replica", type=float, default=0.0)
    p.add_argument("--max-loras-per-replica", type=int, default=8,
                   help="adapters resident in one replica; the least recently used goes first")
    p.add_argument("--max-ongoing-requests", type=int, default=64,
                   help="requests Ray lets into one replica at once")
    p.add_argument("--routing", choices=ROUTINGS, default="multiplexed",
                   help="'blind' ignores which replica holds an adapter (for comparisons)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-loras-per-batch", type=int, default=8)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    return p


def config_from_args(args: argparse.Namespace) -> RayServeConfig:
    from loraplex.server.api import parse_adapter_flags

    adapters = parse_adapter_flags(args.adapter)
    engine_args = dict(device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                       max_loras_per_batch=args.max_loras_per_batch,
                       max_lora_rank=args.max_lora_rank,
                       gpu_memory_utilization=getattr(args, "gpu_memory_utilization", 0.9),
                       kv_cache_memory_bytes=getattr(args, "kv_cache_memory", None),
                       max_full_module_adapters=getattr(args, "max_full_module_adapters", 0),
                       enable_lm_head_lora=getattr(args, "enable_lm_head_lora", False))
    return RayServeConfig(
        model=os.path.realpath(args.model),
        adapters={k: os.path.realpath(v) for k, v in adapters.items()},
        served_model_name=args.served_model_name, replicas=args.replicas,
        num_cpus_per_replica=args.num_cpus_per_replica,
        num_gpus_per_replica=args.num_gpus_per_replica,
        max_loras_per_replica=args.max_loras_per_replica,
        max_ongoing_requests=args.max_ongoing_requests, routing=args.routing,
        api_key=args.api_key or None, engine_args=engine_args)
