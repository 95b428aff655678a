"""Drive the synchronous LLMEngine from one background thread for an asyncio server.

The engine is single-threaded: every call into it (add, abort, step, adapter load/unload,
stats) runs on the engine thread. The event loop hands work over as commands on a
thread-safe queue; the thread runs pending commands between steps, then steps while any
request is unfinished, and blocks on the queue when idle. Each HTTP request owns one
``RequestStream`` (an ``asyncio.Queue`` fed through ``loop.call_soon_threadsafe``), so no
request waits on an unrelated one. A request whose consumer goes away is aborted, which frees
its KV blocks and its adapter slot pin. An exception in ``step()`` fails the requests in
flight with ``EngineStepError`` and the loop keeps serving.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from loraplex.sampling_params import SamplingParams

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineStepError(RuntimeError):
    """The engine failed this request: ``step()`` raised, or the output carries ``error``."""


class EngineDeadError(RuntimeError):
    """The engine thread is not running (shut down or crashed)."""


@dataclass
class SubRequest:
    """One engine request: a prompt (text or token ids), its sampling params and adapter."""

    prompt: str | list[int]
    params: SamplingParams
    adapter: str | None = None


class RequestStream:
    """The outputs of one HTTP request's sub-requests, in arrival order.

    Iterating yields ``(index, RequestOutput)`` where ``index`` is the sub-request's position
    in the list given to ``AsyncEngine.add``; iteration ends once every sub-request finished.
    ``close()`` aborts any sub-request not finished yet (safe to call more than once).
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[str]) -> None:
        self._engine = engine
        self.request_ids = request_ids
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._unfinished = set(range(len(request_ids)))

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def unfinished_indices(self) -> list[int]:
        return sorted(self._unfinished)

    def _put(self, index: int, item: Any) -> None:  # event-loop thread only
        self._queue.put_nowait((index, item))

    async def __aiter__(self) -> AsyncIterator[tuple[int, Any]]:
        while self._unfinished:
            index, item = await self._queue.get()
            if isinstance(item, BaseException):
                self._unfinished.discard(index)
                raise item
            if item.finished:
                self._unfinished.discard(index)
                if getattr(item, "error", None):  # the engine failed this request
                    raise EngineStepError(f"the engine failed this request: {item.error}")
            yield index, item

    def close(self) -> None:
        if self._unfinished:
            self._engine.abort([self.request_ids[i] for i in self._unfinished])
            self._unfinished.clear()


class AsyncEngine:
    """Owns the engine thread. ``start()`` from inside the running event loop."""

    def __init__(self, engine: Any, idle_poll_s: float = 0.5) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        # request id -> (stream, index); touched only on the engine thread.
        self._routes: dict[str, tuple[RequestStream, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle_poll_s = idle_poll_s
        self.num_step_errors = 0

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(lambda: None)  # wake the thread if it is idle
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    # ----------------------------------------------------------------- event-loop side
    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the engine thread between steps; return or raise its result."""
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def command() -> None:
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(*args))
                except Exception as exc:  # handed to the caller, who maps it to HTTP
                    fut.set_exception(exc)

        self._submit(command)
        return await asyncio.wrap_future(fut)

    async def add(self, request_id: str, subs: list[SubRequest]) -> RequestStream:
        """Add sub-requests ``{request_id}-{j}`` atomically: all are admitted or none is.

        Raises what ``engine.add_request`` raises (InvalidRequestError, AdapterNotFoundError,
        ValueError) after undoing the sub-requests already added.
        """
        ids = [f"{request_id}-{j}" for j in range(len(subs))]
        stream = RequestStream(self, ids)
        try:
            await self.call(self._add_all, stream, subs)
        except asyncio.CancelledError:
            # The caller went away while the add was queued: abort whatever got in.
            self.abort(ids)
            raise
        return stream

    def abort(self, request_ids: list[str]) -> None:
        """Abort requests (fire and forget: safe from a cancelled task or a finally block)."""
        if self.alive:
            self._submit(lambda: self._abort_all(request_ids))

    def _submit(self, command: Callable[[], None]) -> None:
        if not self.alive:
            raise EngineDeadError("the engine loop is not running")
        self._commands.put(command)

    # ----------------------------------------------------------------- engine thread
    def _add_all(self, stream: RequestStream, subs: list[SubRequest]) -> None:
        added: list[str] = []
        try:
            for index, (rid, sub) in enumerate(zip(stream.request_ids, subs, strict=True)):
                self.engine.add_request(rid, sub.prompt, sub.params, adapter=sub.adapter)
                added.append(rid)
                self._routes[rid] = (stream, index)
        except Exception:
            self._abort_all(added)
            raise

    def _abort_all(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._routes.pop(rid, None)
            self.engine.abort_request(rid)

    def _run(self) -> None:
        while not self._stop.is_set():
            busy = self._has_work()
            self._run_commands(block=not busy)
            if not self._stop.is_set() and self._has_work():
                self._step()
        self._fail_all(EngineDeadError("the server is shutting down"))

    def _has_work(self) -> bool:
        try:
            return bool(self.engine.has_unfinished_requests())
        except Exception:
            logger.exception("engine.has_unfinished_requests() failed")
            return False

    def _run_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self._idle_poll_s) if block \
                else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            try:
                command()
            except Exception:  # call() routes its own errors; this is a bug in a command
                logger.exception("engine command failed")
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:
            self.num_step_errors += 1
            logger.exception("engine.step() failed; failing the %d requests in flight",
                             len(self._routes))
            self._fail_all(EngineStepError(f"the engine failed while running this request: "
                                           f"{type(exc).__name__}: {exc}"))
            time.sleep(0.01)  # do not spin if the engine keeps failing
            return
        if not outputs:
            time.sleep(0.001)  # work pending but nothing ran (e.g. all waiting): do not spin
            return
        deliveries: list[tuple[RequestStream, int, Any]] = []
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue  # aborted meanwhile: nobody listens any more
            if out.finished:
                del self._routes[out.request_id]
            deliveries.append((route[0], route[1], out))
        self._deliver(deliveries)

    def _fail_all(self, error: BaseException) -> None:
        routes, self._routes = self._routes, {}
        for rid in routes:
            try:
                self.engine.abort_request(rid)
            except Exception:
                logger.exception("engine.abort_request(%r) failed", rid)
        self._deliver([(stream, index, error) for stream, index in routes.values()])

    def _deliver(self, deliveries: list[tuple[RequestStream, int, Any]]) -> None:
        """Hand one step's outputs to the event loop in a single thread-safe callback."""
        if not deliveries or self._loop is None:
            return

        def put_all() -> None:
            for stream, index, item in deliveries:
                stream._put(index, item)

        try:
            self._loop.call_soon_threadsafe(put_all)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass
