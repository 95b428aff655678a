"""The FastAPI app: OpenAI-compatible routes, adapter management, health and metrics.

``create_app`` wires an engine into routes; ``add_serve_args`` / ``run_server`` are what
``loraplex serve`` calls. Every ``/v1`` route requires ``Authorization: Bearer KEY`` when
an API key is set; ``/health`` and ``/metrics`` never do. Every error, including pydantic
validation (FastAPI's 422, answered here as 400) and unknown routes, is an OpenAI-style body
``{"error": {"message", "type", "code", "param"}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraplex.errors import LoraplexError
from loraplex.server.adapters import ServedModels
from loraplex.server.async_engine import AsyncEngine, EngineDeadError, EngineStepError
from loraplex.server.http_errors import error_from_exception
from loraplex.server.metrics import ServerMetrics
from loraplex.server.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    bad_request,
)
from loraplex.server.serving import OpenAIServing

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    served_model_name: str
    model_path: str
    adapters: dict[str, str]  # adapters registered at startup: name -> dir
    api_key: str | None = None
    allow_runtime_adapters: bool = False
    adapter_root: str | None = None


def create_app(engine: Any, config: ServerConfig) -> FastAPI:
    """Build the app around a synchronous ``LLMEngine`` (stepped in a background thread)."""
    async_engine = AsyncEngine(engine)
    registry = ServedModels(config.served_model_name, config.model_path, engine.adapters,
                            config.allow_runtime_adapters, config.adapter_root)
    metrics = ServerMetrics()
    serving = OpenAIServing(async_engine, registry, metrics, engine.tokenizer,
                            engine.max_model_len)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            async_engine.shutdown()

    app = FastAPI(title="loraplex", lifespan=lifespan)
    app.state.async_engine = async_engine
    _install_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_auth_dependency(config.api_key))])

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.alive:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        stats = await async_engine.call(engine.stats)
        return Response(metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        base = {"id": config.served_model_name, "object": "model", "created": started,
                "owned_by": "loraplex", "root": config.model_path, "parent": None,
                "max_model_len": engine.max_model_len}
        adapters = [{"id": a.name, "object": "model", "created": started, "owned_by": "loraplex",
                     "root": a.path, "parent": config.served_model_name}
                    for a in engine.adapters.entries()]
        return {"object": "list", "data": [base, *adapters]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await serving.completions(body, raw)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await serving.chat(body, raw)

    @v1.post("/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> dict[str, Any]:
        path = registry.check_load(body.lora_name, body.lora_path)
        if not os.path.isdir(path):
            raise bad_request(f"lora_path '{body.lora_path}' is not a directory",
                              param="lora_path", code="adapter_load_failed")
        # parsed on the engine's loader threads: neither the event loop nor steps wait
        await asyncio.wrap_future(engine.submit_adapter_load(body.lora_name, path))
        logger.info("loaded adapter %r from %s", body.lora_name, path)
        return {"object": "lora_adapter", "id": body.lora_name, "root": path,
                "status": "loaded"}

    @v1.post("/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> dict[str, Any]:
        registry.check_unload(body.lora_name)
        await async_engine.call(engine.unload_adapter, body.lora_name)
        logger.info("unloaded adapter %r", body.lora_name)
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}

    app.include_router(v1)
    return app


def _auth_dependency(api_key: str | None):
    async def check(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
                token.strip().encode(), api_key.encode()):
            raise APIError(401, "Missing or invalid API key: send 'Authorization: Bearer <key>'",
                           "AuthenticationError", "invalid_api_key")
    return check


def _install_error_handlers(app: FastAPI) -> None:
    def answer(err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        # One message per top-level field (a union type fails once per member: keep the first).
        fields: dict[str, str] = {}
        for e in exc.errors():
            loc = [str(x) for x in e.get("loc", ()) if x != "body"]
            fields.setdefault(loc[0] if loc else "body", f"{'.'.join(loc) or 'body'}: "
                                                         f"{e.get('msg')}")
        message = "invalid request: " + "; ".join(fields.values())
        return answer(bad_request(message, param=next(iter(fields), None)))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(exc.status_code,
                                                                         "HTTPError")
        return answer(APIError(exc.status_code, str(exc.detail), kind, str(exc.status_code)))

    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        err = error_from_exception(exc)
        if err.status >= 500:
            logger.error("request failed: %s", err.message, exc_info=exc)
        return answer(err)

    # Expected errors by class (answered without a traceback); anything else is a 500.
    for kind in (APIError, LoraplexError, ValueError, EngineStepError, EngineDeadError,
                 Exception):
        app.add_exception_handler(kind, on_error)


# ---------------------------------------------------------------------- CLI


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Define the ``loraplex serve`` flags on ``parser``."""
    p = parser
    p.add_argument("--model", required=True, help="Hugging Face model directory (base model)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="register a PEFT adapter directory under NAME (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None,
                   help="the base model's name in the API (default: the model dir's basename)")
    p.add_argument("--max-loras-per-batch", type=int, default=8)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--max-cpu-loras", type=int, default=None)
    p.add_argument("--max-cpu-lora-bytes", type=int, default=None,
                   help="host adapter cache bound in bytes (default: min(RAM/8, 32 GiB))")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV-cache blocks (default: sized from the memory budget)")
    p.add_argument("--lora-backend", default="auto", help="torch | triton | auto")
    p.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes "
                        "(default: $LORAPLEX_API_KEY)")
    p.add_argument("--allow-runtime-adapters", action="store_true",
                   help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter")
    p.add_argument("--adapter-root", default=None,
                   help="runtime-loaded adapters must lie inside this directory")
    p.add_argument("--log-level", default="info")
    return p


def parse_adapter_flags(values: list[str]) -> dict[str, str]:
    """``["name=dir", ...]`` -> ``{name: dir}``; raises ValueError naming the bad flag."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--adapter {value!r} must be NAME=DIR")
        if name in adapters:
            raise ValueError(f"--adapter name {name!r} is given twice")
        adapters[name] = path
    return adapters


def server_config_from_args(args: argparse.Namespace) -> ServerConfig:
    adapters = parse_adapter_flags(args.adapter)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    if name in adapters:
        raise ValueError(f"--adapter name {name!r} equals the served model name")
    if args.adapter_root is not None and not os.path.isdir(args.adapter_root):
        raise ValueError(f"--adapter-root {args.adapter_root!r} is not a directory")
    return ServerConfig(served_model_name=name, model_path=os.path.realpath(args.model),
                        adapters={k: os.path.realpath(v) for k, v in adapters.items()},
                        api_key=args.api_key or None,
                        allow_runtime_adapters=args.allow_runtime_adapters,
                        adapter_root=args.adapter_root)


def run_server(args: argparse.Namespace) -> None:
    """Load the engine from the parsed serve flags and serve until interrupted."""
    import uvicorn

    from loraplex.engine.llm_engine import LLMEngine

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = server_config_from_args(args)
    engine = LLMEngine.from_args(
        model=args.model, adapters=config.adapters, max_loras_per_batch=args.max_loras_per_batch,
        max_lora_rank=args.max_lora_rank, max_cpu_loras=args.max_cpu_loras,
        max_cpu_lora_bytes=args.max_cpu_lora_bytes, device=args.device,
        dtype=args.dtype, max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=args.num_kv_blocks,
        lora_backend=args.lora_backend)
    app = create_app(engine, config)
    logger.info("serving %r with adapters %s on http://%s:%d", config.served_model_name,
                sorted(config.adapters), args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
