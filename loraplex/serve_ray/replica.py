"""One Ray Serve replica: a loraplex engine and the ``loraplex serve`` app, called via ASGI.

``handle`` is an async generator (the ingress calls it with ``stream=True``): it yields the
response head ``{"status", "headers", "replica", "adapter_loads"}`` and then the body
chunks as the app sends them, so server-sent events reach the client token by token.

Adapter residency is Ray's ``@serve.multiplexed`` LRU with ``max_loras_per_replica``
entries: its loader registers the adapter in the engine, and on eviction Ray calls the
returned object's ``__del__``, which unregisters it. An adapter evicted while requests of
this replica still use it is unregistered only once the last of them ends, because the
engine fails queued requests of an adapter that is unloaded under them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

from ray import serve

from loraplex.serve_ray.config import RayServeConfig

logger = logging.getLogger(__name__)


class _Resident:
    """The object Ray's multiplexer holds for a resident adapter. Ray calls ``__del__`` when
    it evicts the adapter (then replaces it on the instance); the garbage collector calls
    the class's ``__del__`` again later, hence the one-shot ``release``."""

    def __init__(self, name: str, release: Callable[[str], None]) -> None:
        self.name = name
        self._release: Callable[[str], None] | None = release

    def __del__(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release(self.name)


class LoraplexReplica:
    def __init__(self, config: RayServeConfig) -> None:
        from loraplex.engine.llm_engine import LLMEngine
        from loraplex.server.api import ServerConfig, create_app

        self.config = config
        # No adapter is registered at start: the multiplexer registers them on demand.
        self.engine = LLMEngine.from_args(model=config.model, adapters={},
                                          **config.engine_args)
        self.app = create_app(self.engine, ServerConfig(
            served_model_name=config.base_name, model_path=config.model, adapters={},
            api_key=config.api_key))
        # the replica's actor name: ray.get_actor(replica_id, namespace="serve") finds it
        self.replica_id = serve.get_replica_context().replica_id.to_full_id_str()
        self._lifespan = contextlib.AsyncExitStack()
        self._started = False
        self._start_lock = asyncio.Lock()
        self._adapter_lock = asyncio.Lock()  # registering and unregistering, one at a time
        self._in_flight: Counter[str] = Counter()
        self._evicted: set[str] = set()  # evicted by Ray, still in use here
        self.requests: Counter[str] = Counter()  # per model name ("" = base model)
        self.loads: Counter[str] = Counter()
        # A plain function, not the bound method: Ray keeps its LRU as an attribute of it.
        async def register(name: str) -> _Resident:
            return await self._register(name)

        self.resident = serve.multiplexed(
            max_num_models_per_replica=config.max_loras_per_replica)(register)

    # -- adapter residency -------------------------------------------------------------------
    async def _register(self, name: str) -> _Resident:
        if name not in self.config.adapters:  # the ingress sends only registered names
            raise KeyError(name)
        async with self._adapter_lock:
            if name in self._evicted:  # evicted but never unregistered: serve it again
                self._evicted.discard(name)
            elif name not in self.engine.adapters:
                await asyncio.wrap_future(
                    self.engine.submit_adapter_load(name, self.config.adapters[name]))
                self.loads[name] += 1
                logger.info("replica %s registered adapter %r", self.replica_id, name)
        loop = asyncio.get_running_loop()

        def release(n: str) -> None:  # from Ray's executor thread, or the GC at exit
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to free
                loop.call_soon_threadsafe(self._evict, n)

        return _Resident(name, release)

    def _evict(self, name: str) -> None:
        self._evicted.add(name)
        if self._in_flight[name] == 0:
            asyncio.ensure_future(self._unregister(name))

    async def _unregister(self, name: str) -> None:
        async with self._adapter_lock:
            if name not in self._evicted or self._in_flight[name] > 0:
                return  # loaded again, or back in use: a later eviction unregisters it
            self._evicted.discard(name)
            await self.app.state.async_engine.call(self.engine.unload_adapter, name)
            logger.info("replica %s unregistered adapter %r", self.replica_id, name)

    # -- requests ----------------------------------------------------------------------------
    async def handle(self, adapter: str | None, method: str, path: str, query: bytes,
                     headers: list[tuple[bytes, bytes]], body: bytes
                     ) -> AsyncIterator[dict[str, Any] | bytes]:
        """Run one HTTP request through the app; yield its head, then its body chunks."""
        async with self._start_lock:  # the app's lifespan starts the engine thread, once
            if not self._started:
                await self._lifespan.enter_async_context(
                    self.app.router.lifespan_context(self.app))
                self._started = True
        if adapter is not None:
            await self.resident(adapter)
            self._in_flight[adapter] += 1
        self.requests[adapter or ""] += 1
        try:
            async for item in self._call_app(method, path, query, headers, body):
                yield item
        finally:
            if adapter is not None:
                self._in_flight[adapter] -= 1
                if adapter in self._evicted and self._in_flight[adapter] == 0:
                    asyncio.ensure_future(self._unregister(adapter))

    async def _call_app(self, method: str, path: str, query: bytes,
                        headers: list[tuple[bytes, bytes]], body: bytes
                        ) -> AsyncIterator[dict[str, Any] | bytes]:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": query, "root_path": "", "headers": headers,
                 "client": ("127.0.0.1", 0), "server": ("loraplex-replica", 80)}
        sent: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        body_given = False

        async def receive() -> dict[str, Any]:
            nonlocal body_given
            if not body_given:
                body_given = True
                return {"type": "http.request", "body": body, "more_body": False}
            await disconnected.wait()  # the app watches for this to end streams early
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            await sent.put(message)

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            finally:
                await sent.put(None)

        task = asyncio.ensure_future(run())
        try:
            while (message := await sent.get()) is not None:
                if message["type"] == "http.response.start":
                    yield {"status": message["status"], "replica": self.replica_id,
                           "adapter_loads": sum(self.loads.values()),
                           "headers": [(bytes(k), bytes(v)) for k, v in message["headers"]]}
                elif message["type"] == "http.response.body":
                    if message.get("body"):
                        yield bytes(message["body"])
                    if not message.get("more_body", False):
                        break
            await task  # the app's own failure, if any, is the caller's
        finally:
            disconnected.set()  # the client left (generator closed): the app aborts
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def stats(self) -> dict[str, Any]:
        """This replica's counters: requests and adapter loads per model name."""
        return {"replica": self.replica_id, "requests": dict(self.requests),
                "loads": dict(self.loads), "resident": self.engine.list_adapters()}
