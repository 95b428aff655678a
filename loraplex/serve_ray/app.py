"""Build the Ray Serve application (``build_app``), from a ``serve run`` config
(``app_builder``) or from ``loraplex serve-ray`` flags (``run_serve_ray``)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

try:
    from ray import serve
except ImportError as exc:  # the optional extra
    raise ImportError('loraplex.serve_ray needs Ray Serve: pip install "loraplex[ray]"') from exc

from loraplex.serve_ray.config import ROUTINGS, RayServeConfig
from loraplex.serve_ray.ingress import Ingress
from loraplex.serve_ray.replica import LoraplexReplica

logger = logging.getLogger(__name__)


def build_app(config: RayServeConfig) -> serve.Application:
    """The ingress bound to ``config.replicas`` engine replicas."""
    actor = {"num_cpus": config.num_cpus_per_replica, "num_gpus": config.num_gpus_per_replica}
    replicas = serve.deployment(LoraplexReplica).options(
        num_replicas=config.replicas, ray_actor_options=actor,
        max_ongoing_requests=config.max_ongoing_requests,
        # a replica's engine takes a while to load: do not declare it dead meanwhile
        health_check_timeout_s=120).bind(config)
    # The ingress only forwards bytes; it can hold every replica's requests at once.
    ingress = serve.deployment(Ingress).options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4 * config.replicas * config.max_ongoing_requests)
    return ingress.bind(replicas, sorted(config.adapters), config.routing)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """``serve run`` entry: ``import_path: loraplex.serve_ray:app_builder``, with ``args``
    the fields of ``RayServeConfig`` (``model``, ``adapters: {name: dir}``, ``replicas``...)."""
    args = dict(args)
    args["model"] = os.path.realpath(args["model"])
    args["adapters"] = {k: os.path.realpath(v) for k, v in (args.get("adapters") or {}).items()}
    return build_app(RayServeConfig(**args))


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
                       kv_cache_memory_bytes=getattr(args, "kv_cache_memory", None))
    return RayServeConfig(
        model=os.path.realpath(args.model),
        adapters={k: os.path.realpath(v) for k, v in adapters.items()},
        served_model_name=args.served_model_name, replicas=args.replicas,
        num_cpus_per_replica=args.num_cpus_per_replica,
        num_gpus_per_replica=args.num_gpus_per_replica,
        max_loras_per_replica=args.max_loras_per_replica,
        max_ongoing_requests=args.max_ongoing_requests, routing=args.routing,
        api_key=args.api_key or None, engine_args=engine_args)


def run_serve_ray(args: argparse.Namespace) -> None:
    """Start (or join) a Ray cluster, deploy the app and serve until interrupted."""
    import ray

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = config_from_args(args)
    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(config), name="loraplex", route_prefix="/")
    logger.info("serving %r with %d replica(s) and adapters %s on http://%s:%d",
                config.base_name, config.replicas, sorted(config.adapters), args.host, args.port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
