"""Drive the synchronous LLMEngine from one background thread for an asyncio server.

The engine is single-threaded: every call into it (add, abort, step, adapter load/unload,
stats) runs on the engine thread. The event loop hands work over as commands on a
thread-safe queue; the thread runs pending commands between steps, then steps while any
request is unfinished, and blocks on the queue when idle. Each HTTP request owns one
``RequestStream`` (a queue fed once per step through ``loop.call_soon_threadsafe``), so no
request waits on an unrelated one.

What crosses to the event loop is an ``OutputDelta`` per sub-request and step: the text and
token ids that step added, never cumulative copies, so a queue's memory is proportional to
how far its reader is behind, not to the square of the output length. Each queue holds at
most ``max_backlog`` steps: a reader that falls further behind (a client that stopped
reading its stream) has its requests aborted with ``StreamBacklogError``, which frees their
KV blocks and adapter pins; ``RequestStream.abandoned`` tells the HTTP layer to drop the
connection. A request whose consumer goes away is aborted too. An exception in ``step()``
fails the requests in flight with ``EngineStepError``; a request the engine ends on its own
with an error (``RequestOutput.error`` or finish reason "error") fails alone with
``RequestFailedError``. The loop keeps serving.
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
    """The engine failed this request: ``step()`` raised while running it."""


class RequestFailedError(EngineStepError):
    """The engine ended this one request with an error; the rest of its batch went on.
    ``index``: the sub-request that failed."""

    def __init__(self, message: str, index: int = 0) -> None:
        super().__init__(message)
        self.index = index


class StreamBacklogError(RuntimeError):
    """The reader of a stream fell too many steps behind; its requests were aborted."""


class EngineDeadError(RuntimeError):
    """The engine thread is not running (shut down or crashed)."""


@dataclass
class SubRequest:
    """One engine request: a prompt (token ids), its sampling params and adapter."""

    prompt: str | list[int]
    params: SamplingParams
    adapter: str | None = None


@dataclass
class OutputDelta:
    """What one step added to one sub-request (``text`` and ``token_ids`` are new only)."""

    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    finished: bool
    finish_reason: str | None
    error: str | None = None
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served


# One step's deliveries to one stream: (sub-request index, delta or exception).
_Step = list[tuple[int, Any]]


class RequestStream:
    """The outputs of one HTTP request's sub-requests, in arrival order.

    Iterating yields ``(index, OutputDelta)`` where ``index`` is the sub-request's position
    in the list given to ``AsyncEngine.add``; iteration ends once every sub-request finished.
    ``close()`` aborts any sub-request not finished yet (safe to call more than once).
    """

    def __init__(self, engine: AsyncEngine, request_ids: list[str], max_backlog: int) -> None:
        self._engine = engine
        self.request_ids = request_ids
        self._queue: asyncio.Queue[_Step] = asyncio.Queue()
        self._max_backlog = max_backlog
        self._unfinished = set(range(len(request_ids)))
        self.abandoned = asyncio.Event()  # set when the reader fell too far behind

    @property
    def finished(self) -> bool:
        return not self._unfinished

    def unfinished_indices(self) -> list[int]:
        return sorted(self._unfinished)

    def _put(self, step: _Step) -> None:  # event-loop thread only
        if self.abandoned.is_set():
            return  # aborted for its backlog: what the engine still sends is dropped
        if self._queue.qsize() >= self._max_backlog:
            self.abandoned.set()
            self._engine.abort([self.request_ids[i] for i in self._unfinished])
            error = StreamBacklogError(
                f"the client fell more than {self._max_backlog} engine steps behind reading "
                f"this stream; the request was aborted")
            step = [(i, error) for i in self._unfinished]
        self._queue.put_nowait(step)

    async def __aiter__(self) -> AsyncIterator[tuple[int, OutputDelta]]:
        while self._unfinished:
            for index, item in await self._queue.get():
                if isinstance(item, BaseException):
                    self._unfinished.discard(index)  # the caller's close() aborts the rest
                    raise item
                if item.finished:
                    self._unfinished.discard(index)
                    if item.error is not None:
                        raise RequestFailedError(item.error, index)
                yield index, item

    def close(self) -> None:
        if self._unfinished:
            self._engine.abort([self.request_ids[i] for i in self._unfinished])
            self._unfinished.clear()


@dataclass
class _Route:
    """Where a request's outputs go, and what of its text was already delivered."""

    stream: RequestStream
    index: int
    text: str = ""
    num_tokens: int = 0

    def delta(self, out: Any) -> OutputDelta:
        """The part of the cumulative ``out`` not delivered yet (engine thread)."""
        text = out.text[len(self.text):] if out.text.startswith(self.text) else ""
        self.text += text
        new_ids = out.token_ids[self.num_tokens:]
        self.num_tokens = len(out.token_ids)
        error = getattr(out, "error", None)
        if error is None and out.finish_reason == "error":
            error = "the engine ended this request with an error"
        return OutputDelta(text, new_ids, len(out.prompt_token_ids), out.finished,
                           out.finish_reason, error, getattr(out, "num_cached_tokens", 0))


class AsyncEngine:
    """Owns the engine thread. ``start()`` from inside the running event loop."""

    def __init__(self, engine: Any, idle_poll_s: float = 0.5, max_backlog: int = 256) -> None:
        self.engine = engine
        self.max_backlog = max_backlog
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        # request id -> route; touched only on the engine thread.
        self._routes: dict[str, _Route] = {}
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
        stream = RequestStream(self, ids, self.max_backlog)
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
                self._routes[rid] = _Route(stream, index)
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
        deliveries: dict[RequestStream, _Step] = {}
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None:
                continue  # aborted meanwhile: nobody listens any more
            if out.finished:
                del self._routes[out.request_id]
            deliveries.setdefault(route.stream, []).append((route.index, route.delta(out)))
        self._deliver(deliveries)

    def _fail_all(self, error: BaseException) -> None:
        routes, self._routes = self._routes, {}
        deliveries: dict[RequestStream, _Step] = {}
        for rid, route in routes.items():
            try:
                self.engine.abort_request(rid)
            except Exception:
                logger.exception("engine.abort_request(%r) failed", rid)
            deliveries.setdefault(route.stream, []).append((route.index, error))
        self._deliver(deliveries)

    def _deliver(self, deliveries: dict[RequestStream, _Step]) -> None:
        """Hand one step's outputs to the event loop in a single thread-safe callback."""
        if not deliveries or self._loop is None:
            return

        def put_all() -> None:
            for stream, step in deliveries.items():
                stream._put(step)

        try:
            self._loop.call_soon_threadsafe(put_all)
        except RuntimeError:  # the event loop is closed: the server is gone
            pass
