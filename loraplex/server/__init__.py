"""OpenAI-compatible HTTP server: ``create_app`` (FastAPI), ``run_server`` (uvicorn).

Modules: protocol.py (request bodies, APIError), middleware.py (auth before the body, body
limit, last-resort 500s), prompts.py (prompt size bound, tokenizing off the event loop and
the engine thread), async_engine.py (the engine thread and per-request bounded streams of
deltas), serving.py (completions / chat), sse.py (event-stream response), adapters.py (model
names, runtime adapter rules), metrics.py (Prometheus), http_errors.py (exception -> HTTP),
api.py (routes, CLI flags).
"""
