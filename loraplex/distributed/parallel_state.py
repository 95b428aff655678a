"""The tensor-parallel group of this process (a minimal stand-in with the shared interface;
the sharded-model work replaces it with the full version).

Models, the checkpoint loader, LoRA buffers and the KV-cache allocator read ``tp_rank()`` /
``tp_size()`` when they are built, so a process that called ``init_tensor_parallel`` first
builds its shard. Nothing is initialised at tensor-parallel size 1: every call is a no-op.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class _State:
    rank = 0
    size = 1
    group = None
    timing = False
    stats: dict = {}


_STATE = _State()


def _reset_stats() -> None:
    _STATE.stats = {"all_reduce_calls": 0, "all_reduce_seconds": 0.0,
                    "all_gather_calls": 0, "all_gather_seconds": 0.0}


_reset_stats()


def init_tensor_parallel(rank: int, world_size: int, init_method: str,
                         backend: str | None = None) -> None:
    """Join the group of ``world_size`` processes (gloo on CPU, nccl on CUDA by default)."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    _STATE.rank, _STATE.size, _STATE.group = rank, world_size, dist.group.WORLD
    _reset_stats()


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
    _STATE.rank, _STATE.size, _STATE.group = 0, 1, None


def tp_rank() -> int:
    return _STATE.rank


def tp_size() -> int:
    return _STATE.size


def tp_group():
    return _STATE.group


def enable_comm_timing(on: bool) -> None:
    """Time every collective (a device sync each: benchmarks only)."""
    _STATE.timing = on


def _timed(name: str, fn) -> None:
    if not _STATE.timing:
        fn()
        _STATE.stats[f"{name}_calls"] += 1
        return
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    _STATE.stats[f"{name}_calls"] += 1
    _STATE.stats[f"{name}_seconds"] += time.perf_counter() - t


def all_reduce_(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the group, in place; a no-op at size 1."""
    if _STATE.size > 1:
        _timed("all_reduce", lambda: dist.all_reduce(x, group=_STATE.group))
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dimension."""
    if _STATE.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.size)]
    _timed("all_gather", lambda: dist.all_gather(parts, x.contiguous(), group=_STATE.group))
    return torch.cat(parts, dim=-1)


def comm_stats() -> dict:
    """Collective counts (and seconds, with ``enable_comm_timing(True)``) since the group was
    initialised."""
    return dict(_STATE.stats)
