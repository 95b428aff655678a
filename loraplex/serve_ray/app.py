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

from loraplex.serve_ray.config import RayServeConfig, config_from_args
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
