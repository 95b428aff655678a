"""Two host threads for the CPU LoRA ops: a call's segments, split in two by rows.

Why: the CPU ops are many small GEMMs (per segment and slice: ``[len, in] x [in, 16..48]``
shrinks, ``[len, 16] x [16, out]`` expands). At two threads each of them is an OpenMP
fork/join of its own, and such GEMMs gain little from a second thread, if anything (decode
sized ones MKL runs on one thread anyway); the adapter weights a decode step reads then
stream through one core. Splitting the *segments* instead gives each thread whole GEMMs:
the caller runs the first half of the rows, a helper thread the second, each GEMM on one
thread (at more threads, on half of them each), one handoff per op call. The halves write
disjoint rows of the output, so the result is the same as one thread's (up to GEMM
summation order).

Only the caller's thread count changes the plan: at one thread (``torch.get_num_threads()``)
the op runs as before, on the caller, and no thread is ever started.
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable

import torch

Segments = list[tuple[int, int, int]]  # (start, length, lora_slot), as LoRABatch.host_segs


class SegmentSplit:
    """Runs ``fn(segments)`` as two halves by rows: the first on the calling thread, the
    second on one helper thread (started on first use). Not reentrant: one op call at a
    time, as the engine runs them (one forward at a time, layer after layer)."""

    def __init__(self) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0  # the process that started the helper (a forked child has none)

    def run(self, fn: Callable[[Segments], None], segs: Segments) -> None:
        threads = torch.get_num_threads()
        first, second = halves(segs)
        if threads < 2 or not first or not second:
            fn(segs)
            return
        if self._thread is None or self._pid != os.getpid():
            self._start()
        # the threads are shared out: at two, each half's GEMMs run on one thread
        self._tasks.put((fn, second, threads - threads // 2, torch.is_inference_mode_enabled(),
                         torch.is_grad_enabled()))
        torch.set_num_threads(threads // 2)
        try:
            fn(first)
        finally:
            error = self._done.get()  # wait even when fn raised: the helper writes our rows
            # after the helper's set_num_threads (it also sets torch's process-wide default)
            torch.set_num_threads(threads)
        if error is not None:
            raise error

    def _start(self) -> None:
        self._tasks, self._done, self._pid = queue.SimpleQueue(), queue.SimpleQueue(), os.getpid()
        ready = threading.Event()
        self._thread = threading.Thread(target=_serve, args=(self._tasks, self._done, ready),
                                         name="loraplex-lora-split", daemon=True)
        self._thread.start()
        ready.wait()
        # the helper holds only the queues, so it ends when this object goes away; not at
        # interpreter exit (a daemon thread woken while the interpreter finalizes is killed
        # in place): there it just stays blocked on its queue
        weakref.finalize(self, self._tasks.put, None).atexit = False


def halves(segs: Segments) -> tuple[Segments, Segments]:
    """``segs`` cut at the middle row (a segment across it becomes two, same slot)."""
    total = sum(length for _, length, _ in segs)
    mid, rows = total // 2, 0
    for j, (start, length, slot) in enumerate(segs):
        if rows + length > mid:
            cut = mid - rows
            head = [*segs[:j], (start, cut, slot)] if cut else segs[:j]
            return head, [(start + cut, length - cut, slot), *segs[j + 1 :]]
        rows += length
    return segs, []


def _serve(tasks: queue.SimpleQueue, done: queue.SimpleQueue, ready: threading.Event) -> None:
    # torch sets a thread's count lazily, from the process-wide default, on the thread's first
    # query or parallel op: have that happen now, or it would undo the first task's count
    torch.get_num_threads()
    ready.set()
    while (task := tasks.get()) is not None:
        fn, segs, threads, inference, grad = task
        torch.set_num_threads(threads)
        try:
            # grad and inference mode are per thread: take the caller's (in-place writes to
            # inference tensors are refused outside inference mode)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                fn(segs)
        except BaseException as exc:  # handed to the caller, which raises it (and never
            done.put(exc)  # waits forever on a helper that died without answering)
        else:
            done.put(None)
