"""Rank 0's side of tensor parallelism: start the workers, mirror every model call to them,
notice when one dies, stop them.

Rank 0 runs the scheduler, the API and the ``ModelRunner`` (which samples) as at size 1. The
seam is three proxies (``proxies.py``) installed on the engine once it is built
(``attach``): around the model, the decode graphs and the LoRA buffers, so ``ModelRunner``
and ``Scheduler`` do not know about ranks. All sends come from the engine thread, the only
caller of the model and of the slot pool.

Failure: before each send the executor looks at the workers' exit codes, and a collective
whose peer died raises at once (gloo: connection closed). Either way it stops the other
workers, leaves the process group and raises ``TensorParallelError`` naming the rank and
its exit code (and the worker's own error when it reported one); the engine then fails
every request it holds and refuses new ones.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing.connection
import os
import signal
import tempfile
import threading

import torch
import torch.multiprocessing as mp

from loraplex.distributed.channel import Command, ControlChannel, open_control_group
from loraplex.distributed.parallel_state import destroy_tensor_parallel, init_tensor_parallel
from loraplex.errors import TensorParallelError

logger = logging.getLogger(__name__)

# Seconds a worker may take to leave after SHUTDOWN before it is terminated, then killed.
_JOIN_S = 10.0
_POLL_S = 0.1


class TPExecutor:
    """The workers of one tensor-parallel engine (ranks 1..N-1) and the channel to them."""

    def __init__(self, procs: list, channel: ControlChannel, errors, init_file: str) -> None:
        self.procs = procs
        self.channel = channel
        self._errors = errors
        self._init_file = init_file
        self.error: TensorParallelError | None = None
        self.closed = False
        atexit.register(self.close)

    @classmethod
    def launch(cls, world_size: int, engine_kwargs: dict, device: torch.device,
               threads: int) -> TPExecutor:
        """Spawn ranks 1..``world_size``-1 (each builds the engine from ``engine_kwargs``
        with ``threads`` CPU threads) and join the group as rank 0."""
        from loraplex.distributed.worker import worker_main

        backend = "nccl" if device.type == "cuda" else "gloo"
        fd, path = tempfile.mkstemp(prefix="loraplex-tp-")
        os.close(fd)
        os.unlink(path)  # the file store creates it; it must not exist yet
        init = f"file://{path}"
        ctx = mp.get_context("spawn")
        errors = ctx.SimpleQueue()
        procs = [ctx.Process(target=worker_main, name=f"loraplex-tp-rank{rank}", daemon=True,
                             args=(rank, world_size, init, backend, engine_kwargs, errors,
                                   threads))
                 for rank in range(1, world_size)]
        for p in procs:
            p.start()
        try:
            join_group(world_size, init, backend, procs)
            channel = ControlChannel(open_control_group())
        except BaseException:
            _stop(procs)
            destroy_tensor_parallel()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        return cls(procs, channel, errors, path)

    # -- the engine's side -----------------------------------------------------------------------
    def agree_num_blocks(self, num_blocks: int) -> int:
        """Every rank sizes its KV cache, then all take the smallest count (ranks' free
        memory may differ); rank 0's scheduler plans with that count."""
        return self._call(lambda: self.channel.all_min(num_blocks))

    def attach(self, engine) -> None:
        """Install the proxies (``proxies.py``) on rank 0's built engine."""
        from loraplex.distributed.proxies import DecodeGraphsProxy, LoRABuffersProxy, ModelProxy

        runner = engine.runner
        runner.model = ModelProxy(runner.model, self)
        if runner.graphs is not None:
            runner.graphs = DecodeGraphsProxy(runner.graphs, self)
        engine.lora_pool.buffers = LoRABuffersProxy(engine.lora_pool.buffers, self)

    def comm_stats(self, enable_timing: bool | None = None, reset: bool = False) -> list[dict]:
        """Every rank's collective counts and seconds (``parallel_state.comm_stats``) in rank
        order, then, on every rank, switch timing on or off and reset the counts if asked
        (benchmarks)."""
        from loraplex.distributed.worker import update_comm_stats

        self.send(Command.COMM_STATS, (enable_timing, reset))
        mine = update_comm_stats(enable_timing, reset)
        return self._call(lambda: self.channel.gather(mine))

    def send(self, command: Command, payload=None) -> None:
        self._call(lambda: self.channel.send(command, payload))

    def check(self) -> None:
        """Raise the failure that stopped this executor, or find a worker that exited."""
        if self.error is not None:
            raise self.error
        if self.closed:
            raise TensorParallelError("the tensor-parallel engine was closed")
        dead = [p for p in self.procs if p.exitcode is not None]
        if dead:
            self._fail(dead[0], None)

    def failure(self) -> str | None:
        """Why this executor cannot serve (a recorded failure, or a worker that exited), or
        None; looks only, changes nothing (safe from another thread, e.g. a health check)."""
        if self.error is not None:
            return str(self.error)
        dead = next((p for p in self.procs if p.exitcode is not None), None)
        return None if dead is None else f"tensor-parallel worker {dead.name} exited"

    def _call(self, fn):
        """A channel operation: any RuntimeError it raises is the channel failing (a send
        to a killed worker may say "Connection reset" before its exit shows)."""
        self.check()
        return self._guarded(fn, comm=True)

    def guard(self, fn):
        """Run ``fn`` (a model call); a ``RuntimeError`` it raises because a worker died (a
        collective whose peer closed its connection) becomes the executor's failure. Other
        errors pass through unchanged."""
        return self._guarded(fn, comm=None)

    def _guarded(self, fn, comm: bool | None):
        try:
            return fn()
        except RuntimeError as exc:
            if comm is None:
                comm = _is_comm_error(exc)
            # a communication error: give the dead worker's exit time to show
            ready = multiprocessing.connection.wait([p.sentinel for p in self.procs],
                                                    _JOIN_S if comm else 0)
            dead = next((p for p in self.procs if p.sentinel in ready), None)
            if dead is None and not comm:
                raise
            self._fail(dead, exc)

    def _fail(self, proc, exc: BaseException | None) -> None:
        reports = []
        with contextlib.suppress(OSError, EOFError):
            while not self._errors.empty():
                reports.append(self._errors.get())
        if proc is not None:
            proc.join(_JOIN_S)  # its sentinel may fire a moment before it can be reaped
            code = proc.exitcode
            how = (f"was killed by {signal.Signals(-code).name}"
                   if code is not None and code < 0 else f"exited with code {code}")
            what = f"tensor-parallel worker {proc.name} {how}"
        else:
            what = f"a tensor-parallel collective failed: {exc}"
        detail = f" ({'; '.join(reports)})" if reports else ""
        self.error = TensorParallelError(f"{what}{detail}; the engine has shut down and "
                                         f"cannot serve requests any more")
        logger.error("%s", self.error)
        self.close()
        raise self.error from exc

    def close(self, graceful: bool = True) -> None:
        """Stop the workers (SHUTDOWN, then terminate / kill the ones that linger) and leave
        the process group. Safe to call more than once, and after a failure. ``graceful=False``
        sends nothing (the workers may be inside a collective, e.g. a failed start-up)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        if graceful and self.error is None and all(p.exitcode is None for p in self.procs):
            with contextlib.suppress(RuntimeError):
                self.channel.send(Command.SHUTDOWN)
        _stop(self.procs)
        destroy_tensor_parallel()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._init_file)
        with contextlib.suppress(OSError):
            self._errors.close()


def join_group(world_size: int, init_method: str, backend: str, procs: list) -> None:
    """``init_tensor_parallel`` as rank 0, given up with ``TensorParallelError`` when a
    worker exits first: the rendezvous would wait for it until the store's timeout (30 min).
    The rendezvous runs on a helper thread, left to that timeout in the failure case."""
    done = threading.Event()
    failed: list[BaseException] = []

    def rendezvous() -> None:
        try:
            init_tensor_parallel(0, world_size, init_method, backend)
        except BaseException as exc:
            failed.append(exc)
        finally:
            done.set()

    threading.Thread(target=rendezvous, name="loraplex-tp-rendezvous", daemon=True).start()
    while not done.wait(_POLL_S):
        dead = next((p for p in procs if p.exitcode is not None), None)
        if dead is not None:
            raise TensorParallelError(f"tensor-parallel worker {dead.name} exited with code "
                                      f"{dead.exitcode} before joining the group")
    if failed:
        raise failed[0]


def _is_comm_error(exc: RuntimeError) -> bool:
    text = str(exc)
    return (isinstance(exc, torch.distributed.DistError)
            or any(word in text for word in ("gloo", "NCCL", "Connection")))


def _stop(procs: list) -> None:
    for p in procs:
        p.join(_JOIN_S if p.exitcode is None else 0)
    for p in procs:
        if p.exitcode is None:
            p.terminate()
            p.join(_JOIN_S)
        if p.exitcode is None:
            p.kill()
            p.join()
