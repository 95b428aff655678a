"""A tensor-parallel worker process (ranks 1..N-1): build the same engine as rank 0, then run
the model calls rank 0 sends until told to stop.

The worker builds its engine through the same ``LLMEngine.from_args`` as rank 0 (after
``init_tensor_parallel``, so the model, LoRA buffers and KV cache it builds are its shards;
the KV-cache block count is agreed with rank 0 there). Of that engine it uses the model, the
KV cache, the LoRA buffers and batch builder, and the decode graphs; its scheduler and
sampler stay idle (rank 0 samples). Commands: see ``channel.Command``.

A worker leaves when rank 0 says SHUTDOWN, when rank 0's connection closes (it died: the
broadcast raises), or when its parent process is gone. An error is reported to rank 0 over
the ``errors`` queue, printed, and ends the process with exit code 1, which rank 0 notices.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback

import torch

from loraplex.distributed.channel import (
    LAST,
    SAME,
    Command,
    ControlChannel,
    open_control_group,
    prepare_lora,
    unpack_batch,
)
from loraplex.distributed.parallel_state import (
    comm_stats,
    enable_comm_timing,
    init_tensor_parallel,
    reset_comm_stats,
)
from loraplex.layers.forward_context import forward_context

_PARENT_POLL_S = 1.0


def worker_main(rank: int, world_size: int, init_method: str, backend: str,
                engine_kwargs: dict, errors, threads: int) -> None:
    """The spawned process's entry point."""
    from loraplex.engine.llm_engine import LLMEngine

    torch.set_num_threads(threads)
    # Ctrl-C reaches the whole process group: rank 0 decides (close() stops the workers)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(os.getppid())
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        init_tensor_parallel(rank, world_size, init_method, backend)
        peer = WorkerPeer(ControlChannel(open_control_group()))
        LLMEngine.from_args(**engine_kwargs, _tp_peer=peer)
        peer.serve()
    except BaseException as exc:  # report, then exit: rank 0 sees the exit code
        traceback.print_exc()
        try:
            errors.put(f"rank {rank}: {type(exc).__name__}: {exc}")
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
    # no destroy_process_group: rank 0 may already be gone, and exiting closes the sockets
    os._exit(0)


def _exit_with_parent(parent: int) -> None:
    """Leave when rank 0's process is gone (reparented), even if no collective notices."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="loraplex-tp-parent-watch", daemon=True).start()


class WorkerPeer:
    """A worker's engine-side hooks (``agree_num_blocks``, ``attach``) and its command loop."""

    def __init__(self, channel: ControlChannel) -> None:
        self.channel = channel
        self.engine = None
        self._batch = None
        self._hidden: torch.Tensor | None = None

    def agree_num_blocks(self, num_blocks: int) -> int:
        return self.channel.all_min(num_blocks)

    def attach(self, engine) -> None:
        self.engine = engine

    def failure(self) -> None:  # a worker's engine never serves requests itself
        return None

    @torch.inference_mode()
    def serve(self) -> None:
        engine = self.engine
        assert engine is not None, "the worker's engine was not built"
        runner, buffers = engine.runner, engine.lora_pool.buffers
        while True:
            command, payload = self.channel.recv(engine.device)
            if command is Command.FORWARD:
                ids, positions, fields = payload
                self._batch = unpack_batch(fields, engine.kv_caches, engine.lora_batches)
                self._hidden = None  # free the last step's before this one's
                with forward_context(self._batch):
                    self._hidden = runner.model(ids, positions)
            elif command is Command.LOGITS:
                self._logits(*payload)
            elif command is Command.DECODE_GRAPH:
                runner.graphs.run(*payload)
            elif command is Command.LORA_WRITE:
                buffers.write(*payload)
            elif command is Command.LORA_CLEAR:
                buffers.clear(payload)
            elif command is Command.COMM_STATS:
                self.channel.gather(update_comm_stats(*payload))
            else:
                assert command is Command.SHUTDOWN, command
                return

    def _logits(self, hidden, fields) -> None:
        engine = self.engine
        if isinstance(hidden, str):
            assert hidden == LAST
            hidden = self._hidden
        if fields is None:
            engine.runner.model.compute_logits(hidden)
            return
        if isinstance(fields, tuple) and fields[0] == SAME:
            self._batch.lora = prepare_lora(engine.lora_batches, fields[1])
            batch = self._batch
        else:
            batch = unpack_batch(fields, engine.kv_caches, engine.lora_batches)
        with forward_context(batch):
            engine.runner.model.compute_logits(hidden)


def update_comm_stats(enable_timing: bool | None, reset: bool) -> dict:
    """This rank's collective stats (``parallel_state.comm_stats``), then apply the switches
    (benchmarks: ``TPExecutor.comm_stats``)."""
    stats = comm_stats()
    if enable_timing is not None:
        enable_comm_timing(enable_timing)
    if reset:
        reset_comm_stats()
    return stats
