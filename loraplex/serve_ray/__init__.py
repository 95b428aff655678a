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

``app.build_app(RayServeConfig(...))`` returns the Serve application; ``app.app_builder``
is the ``serve run`` entry. Ray is an optional dependency (``pip install "loraplex[ray]"``):
importing ``loraplex.serve_ray.app`` without it raises ImportError naming the extra, while
``config`` (the flags and their validation) needs no Ray.
"""
