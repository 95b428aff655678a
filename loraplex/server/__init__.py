"""OpenAI-compatible HTTP server: ``create_app`` (FastAPI), ``run_server`` (uvicorn).

Modules: protocol.py (request bodies, APIError), async_engine.py (the engine thread and
per-request streams), serving.py (completions / chat), adapters.py (model names, runtime
adapter rules), metrics.py (Prometheus), http_errors.py (exception -> HTTP), api.py (routes,
CLI flags).
"""
