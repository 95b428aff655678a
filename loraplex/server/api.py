"""The FastAPI app: OpenAI-compatible routes, adapter management, health and metrics.

Besides OpenAI's routes (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models`` and
``/v1/models/{id}``), vLLM's: ``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``,
``/tokenize``, ``/detokenize`` and ``/version``.

``create_app`` wires an engine into routes; ``add_serve_args`` / ``run_server`` are what
``loraplex serve`` calls. Every ``/v1`` route requires ``Authorization: Bearer KEY`` when
an API key is set, checked before the body is read; ``/health`` and ``/metrics`` never do.
Bodies are capped (``--max-request-bytes``, 413) and requests at ``len(prompts) * n``
sequences (``--max-sequences-per-request``). Every error, including pydantic validation
(FastAPI's 422, answered here as 400) and unknown routes, is an OpenAI-style body
``{"error": {"message", "type", "code", "param"}}``, and none closes the connection. The
interactive docs (``/docs``, ``/redoc``, ``/openapi.json``) are off unless
``--enable-docs``. Errors name adapters and paths as the client gave them, never the
server's absolute paths.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from loraplex.cli import add_lm_head_lora_arg, add_tensor_parallel_arg
from loraplex.errors import AdapterLoadError
from loraplex.server.adapters import ServedModels
from loraplex.server.async_engine import AsyncEngine
from loraplex.server.metrics import ServerMetrics
from loraplex.server.middleware import RequestGuard, install_error_handlers
from loraplex.server.prompts import PromptTokenizer
from loraplex.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
    bad_request,
    not_found,
)
from loraplex.server.serving import OpenAIServing
from loraplex.server.tools import TOOL_CALL_PARSERS, detect_parser

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """What the HTTP layer needs besides the engine. ``allow_runtime_adapters`` needs an
    ``adapter_root`` unless ``allow_any_adapter_path`` says any server-readable directory
    may be loaded (then a warning is logged at start)."""

    served_model_name: str
    model_path: str
    adapters: dict[str, str]  # adapters registered at startup: name -> dir
    api_key: str | None = None
    allow_runtime_adapters: bool = False
    adapter_root: str | None = None
    allow_any_adapter_path: bool = False
    enable_docs: bool = False
    max_request_bytes: int = 8 << 20
    max_sequences_per_request: int = 256
    max_stream_backlog: int = 256  # engine steps a stream's reader may fall behind
    tokenizer_threads: int = 2
    tool_call_parser: str | None = None  # None: detected from the chat template (tools.py)

    def __post_init__(self) -> None:
        if self.allow_runtime_adapters and self.adapter_root is None \
                and not self.allow_any_adapter_path:
            raise ValueError("--allow-runtime-adapters needs --adapter-root DIR (the directory "
                             "runtime-loaded adapters must lie in); pass "
                             "--allow-any-adapter-path to let clients load any directory the "
                             "server can read")
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ValueError(f"--tool-call-parser {self.tool_call_parser!r} must be one of "
                             f"{', '.join(TOOL_CALL_PARSERS)}")
        for name in ("max_request_bytes", "max_sequences_per_request", "max_stream_backlog",
                     "tokenizer_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


def create_app(engine: Any, config: ServerConfig) -> FastAPI:
    """Build the app around a synchronous ``LLMEngine`` (stepped in a background thread)."""
    if config.allow_runtime_adapters and config.adapter_root is None:
        logger.warning("SECURITY: --allow-any-adapter-path: clients with the API key can load "
                       "an adapter from ANY directory this server can read")
    async_engine = AsyncEngine(engine, max_backlog=config.max_stream_backlog)
    registry = ServedModels(config.served_model_name, config.model_path, engine.adapters,
                            config.allow_runtime_adapters, config.adapter_root)
    metrics = ServerMetrics()
    prompts = PromptTokenizer(engine.tokenizer, engine.max_model_len, config.tokenizer_threads)
    tool_parser = config.tool_call_parser or detect_parser(
        getattr(engine.tokenizer, "chat_template", None))
    serving = OpenAIServing(async_engine, registry, metrics, prompts,
                            config.max_sequences_per_request, tool_parser)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async_engine.start()
        try:
            yield
        finally:
            async_engine.shutdown()
            prompts.shutdown()

    docs = {} if config.enable_docs else dict(docs_url=None, redoc_url=None, openapi_url=None)
    app = FastAPI(title="loraplex", lifespan=lifespan, **docs)
    app.state.async_engine = async_engine
    app.add_middleware(RequestGuard, api_key=config.api_key,
                       max_request_bytes=config.max_request_bytes)
    install_error_handlers(app)
    v1 = APIRouter(prefix="/v1")

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.alive:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        failure = getattr(engine, "failure", lambda: None)()  # a tensor-parallel worker died
        if failure is not None:
            return JSONResponse({"status": f"engine failed: {failure}"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        stats = await async_engine.call(engine.stats)
        return Response(metrics.render(stats), media_type=CONTENT_TYPE_LATEST)

    def model_cards() -> list[dict[str, Any]]:
        base = {"id": config.served_model_name, "object": "model", "created": started,
                "owned_by": "loraplex", "root": config.model_path, "parent": None,
                "max_model_len": engine.max_model_len}
        adapters = [{"id": a.name, "object": "model", "created": started, "owned_by": "loraplex",
                     "root": a.path, "parent": config.served_model_name}
                    for a in engine.adapters.entries()]
        return [base, *adapters]

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": model_cards()}

    @v1.get("/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        for card in model_cards():
            if card["id"] == model_id:
                return card
        raise not_found(f"The model '{model_id}' does not exist.")

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": _version()}

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            registry.resolve_model(body.model)  # 404 if unknown; adapters share the tokenizer
        if body.messages is not None:
            if not getattr(prompts.tokenizer, "chat_template", None):
                raise bad_request(f"the model '{config.served_model_name}' has no chat "
                                  "template", param="messages", code="no_chat_template")
            ids, strs = await prompts.tokenize(
                [m.to_template_dict() for m in body.messages], body.add_special_tokens,
                body.add_generation_prompt, sum(m.num_chars() for m in body.messages))
        else:
            ids, strs = await prompts.tokenize(body.prompt or "", body.add_special_tokens)
        return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids,
                "token_strs": strs if body.return_token_strs else None}

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        if body.model is not None:
            registry.resolve_model(body.model)
        vocab = len(prompts.tokenizer)
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise bad_request(f"token id {bad[0]} is outside the tokenizer's vocabulary "
                              f"(size {vocab})", param="tokens")
        return {"prompt": await prompts.decode(body.tokens)}

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
        try:  # parsed on the engine's loader threads: neither the event loop nor steps wait
            await asyncio.wrap_future(engine.submit_adapter_load(body.lora_name, path))
        except AdapterLoadError as exc:  # name the files as the client did, not by real path
            raise bad_request(str(exc).replace(path, body.lora_path), param="lora_path",
                              code="adapter_load_failed") from None
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


def _version() -> str:
    """The installed distribution's version (a source checkout run in place has none)."""
    try:
        return importlib.metadata.version("loraplex")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


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
    p.add_argument("--lora-backend", default="auto", choices=["auto", "torch", "cpu", "triton"],
                   help="auto: triton on CUDA, the C ops ('cpu') on CPU when they build here")
    add_tensor_parallel_arg(p)
    add_lm_head_lora_arg(p)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True, help="share KV blocks of equal prefixes per adapter")
    p.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                   default=True, help="prefill chunks and decodes share each step's budget")
    p.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes "
                        "(default: $LORAPLEX_API_KEY)")
    p.add_argument("--allow-runtime-adapters", action="store_true",
                   help="enable /v1/load_lora_adapter and /v1/unload_lora_adapter "
                        "(needs --adapter-root)")
    p.add_argument("--adapter-root", default=None,
                   help="runtime-loaded adapters must lie inside this directory")
    p.add_argument("--allow-any-adapter-path", action="store_true",
                   help="with --allow-runtime-adapters and no --adapter-root: let clients load "
                        "any directory the server can read (unsafe; logged at start)")
    p.add_argument("--enable-docs", action="store_true",
                   help="serve /docs, /redoc and /openapi.json (off by default)")
    p.add_argument("--max-request-bytes", type=int, default=ServerConfig.max_request_bytes,
                   help="larger request bodies are refused with 413 (default: 8 MiB)")
    p.add_argument("--max-sequences-per-request", type=int,
                   default=ServerConfig.max_sequences_per_request,
                   help="cap on len(prompts) x n in one request (default: 256)")
    p.add_argument("--max-stream-backlog", type=int, default=ServerConfig.max_stream_backlog,
                   help="engine steps a stream's client may fall behind before its request "
                        "is aborted and the connection closed (default: 256)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0,
                   help="seconds to let requests finish on SIGTERM before aborting them")
    p.add_argument("--log-level", default="info")
    p.add_argument("--tool-call-parser", choices=TOOL_CALL_PARSERS, default=None,
                   help="how chat replies are parsed into tool_calls (default: detected from "
                        "the chat template: '<tool_call>' -> hermes, '<|python_tag|>' or "
                        "'\"parameters\"' -> llama3_json)")
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
    return ServerConfig(served_model_name=name, model_path=_local_or_hub(args.model),
                        adapters={k: _local_or_hub(v) for k, v in adapters.items()},
                        api_key=args.api_key or None,
                        allow_runtime_adapters=args.allow_runtime_adapters,
                        adapter_root=args.adapter_root,
                        allow_any_adapter_path=args.allow_any_adapter_path,
                        enable_docs=args.enable_docs, max_request_bytes=args.max_request_bytes,
                        max_sequences_per_request=args.max_sequences_per_request,
                        max_stream_backlog=args.max_stream_backlog,
                        tool_call_parser=getattr(args, "tool_call_parser", None))


def _local_or_hub(path: str) -> str:
    """A local path made absolute; anything else as given (a hub id, ``org/name[@rev]``, which
    made absolute would no longer read as one)."""
    return os.path.realpath(path) if os.path.exists(path) else path


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
        lora_backend=args.lora_backend,
        enable_prefix_caching=getattr(args, "enable_prefix_caching", True),
        enable_chunked_prefill=getattr(args, "enable_chunked_prefill", True),
        gpu_memory_utilization=getattr(args, "gpu_memory_utilization", 0.9),
        kv_cache_memory_bytes=getattr(args, "kv_cache_memory", None),
        max_full_module_adapters=getattr(args, "max_full_module_adapters", 0),
        tensor_parallel_size=getattr(args, "tensor_parallel_size", 1),
        enable_lm_head_lora=getattr(args, "enable_lm_head_lora", False))
    try:
        app = create_app(engine, config)
        logger.info("serving %r with adapters %s on http://%s:%d", config.served_model_name,
                    sorted(config.adapters), args.host, args.port)
        # timeout_graceful_shutdown: on SIGTERM, connections still open after the deadline
        # (a stream nobody reads) are cancelled, which aborts their engine requests.
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                    timeout_graceful_shutdown=args.shutdown_timeout)
    finally:
        engine.close()  # stops tensor-parallel workers
