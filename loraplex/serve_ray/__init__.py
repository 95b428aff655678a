"""Many loraplex replicas behind one OpenAI-compatible endpoint, on Ray Serve.

Ray Serve does the distributed part (replica actors, health checks and restarts, the HTTP
proxy, request routing); loraplex adds two deployments:

- ``replica.LoraplexReplica``: one engine plus the regular ``loraplex serve`` FastAPI app,
  called in-process through ASGI, so routes and error bodies are exactly those of
  ``loraplex serve``. Adapters become resident through ``@serve.multiplexed``: loading a
  model id registers the adapter from its registered directory, Ray's LRU eviction
  unregisters it.
- ``ingress.Ingress``: reads ``model`` from the request body and forwards the raw request
  to a replica with ``multiplexed_model_id=model``, so Ray routes it to a replica that
  already holds that adapter. A request whose replica dies before anything reached the
  client is retried once.

Ray is an optional dependency (``pip install "loraplex[ray]"``); importing this package
without it raises ImportError naming the extra.
"""

from loraplex.serve_ray.app import RayServeConfig, app_builder, build_app

__all__ = ["RayServeConfig", "app_builder", "build_app"]
