"""The tensor-parallel process group of this process, and the two collectives a sharded model
needs (``torch.distributed``: gloo on CPU, NCCL on CUDA).

A worker calls ``init_tensor_parallel`` once, before it builds anything; models, the checkpoint
loader, the LoRA buffers and the KV-cache allocator then read ``tp_rank()`` / ``tp_size()`` at
construction and build this rank's shards. Without that call every reader sees rank 0 of 1 and
the collectives are no-ops, so single-device code runs unchanged.

The state is one object per process (like torch.distributed's own default group): a process
belongs to one tensor-parallel group, and every layer must see the same one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from loraplex.errors import ConfigError


@dataclass
class _TPState:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None
    owns_default_group: bool = False  # this module initialised torch.distributed
    timing: bool = False
    stats: dict[str, float] = field(default_factory=dict)


_state = _TPState()

_STAT_KEYS = ("all_reduce_calls", "all_reduce_seconds", "all_reduce_bytes",
              "all_gather_calls", "all_gather_seconds", "all_gather_bytes")


def init_tensor_parallel(rank: int, world_size: int, init_method: str,
                         backend: str | None = None) -> None:
    """Join a tensor-parallel group of ``world_size`` processes as ``rank`` (every rank calls
    this with the same ``init_method``, e.g. ``tcp://127.0.0.1:PORT`` or ``file:///tmp/x``).
    ``backend``: "gloo" | "nccl" (default: NCCL when CUDA is available, else gloo). With NCCL
    this process's current CUDA device becomes ``cuda:rank``. ``world_size == 1`` creates no
    group."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"tensor-parallel rank={rank} must be in [0, world_size={world_size})")
    if _state.size != 1:
        raise ConfigError(f"tensor parallelism is already initialised (rank {_state.rank} of "
                          f"{_state.size}); call destroy_tensor_parallel() first")
    if world_size == 1:
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ConfigError(f"tensor-parallel backend={backend!r} must be 'gloo' or 'nccl'")
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=world_size)
    elif dist.get_world_size() != world_size:
        raise ConfigError(f"torch.distributed is initialised with world size "
                          f"{dist.get_world_size()}, tensor parallelism asks for {world_size}")
    _state.rank, _state.size, _state.owns_default_group = rank, world_size, owns
    _state.group = dist.group.WORLD
    reset_comm_stats()


def destroy_tensor_parallel() -> None:
    """Leave the group (and tear down torch.distributed if ``init_tensor_parallel`` set it
    up); afterwards this process is rank 0 of 1 again."""
    if _state.owns_default_group and dist.is_initialized():
        dist.destroy_process_group()
    _state.rank, _state.size, _state.group, _state.owns_default_group = 0, 1, None, False


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.size


def tp_group() -> dist.ProcessGroup | None:
    """The group's ProcessGroup, or None at size 1."""
    return _state.group


def all_reduce_(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the group in place and return it (a no-op at size 1). ``x`` must be
    contiguous (collectives work on whole storage)."""
    if _state.size == 1:
        return x
    assert x.is_contiguous(), "all_reduce_ needs a contiguous tensor"
    start = _start_timer(x)
    dist.all_reduce(x, group=_state.group)
    _count("all_reduce", x, start)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """``x [..., n]`` on each rank -> ``[..., size * n]``: the ranks' tensors concatenated in
    rank order along the last dim (``x`` itself at size 1)."""
    if _state.size == 1:
        return x
    x = x.contiguous()
    start = _start_timer(x)
    parts = [torch.empty_like(x) for _ in range(_state.size)]
    dist.all_gather(parts, x, group=_state.group)
    out = torch.cat(parts, dim=-1)
    _count("all_gather", x, start)
    return out


def enable_comm_timing(enabled: bool) -> None:
    """Time each collective (benchmarks; on CUDA this synchronises around every call)."""
    _state.timing = enabled


def reset_comm_stats() -> None:
    _state.stats = dict.fromkeys(_STAT_KEYS, 0.0)


def comm_stats() -> dict[str, float]:
    """Calls, bytes sent per rank and (with ``enable_comm_timing(True)``) seconds spent in
    each collective since the group was set up or ``reset_comm_stats``. Calls made while a CUDA
    graph replays are not seen (the graph holds them)."""
    if not _state.stats:
        reset_comm_stats()
    return dict(_state.stats)


def _start_timer(x: torch.Tensor) -> float | None:
    # never while a CUDA graph is being captured: a synchronize would break the capture
    if not _state.timing or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    return time.perf_counter()


def _count(op: str, x: torch.Tensor, start: float | None) -> None:
    stats = _state.stats or dict.fromkeys(_STAT_KEYS, 0.0)
    _state.stats = stats
    stats[f"{op}_calls"] += 1
    stats[f"{op}_bytes"] += x.numel() * x.element_size()
    if start is not None:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        stats[f"{op}_seconds"] += time.perf_counter() - start
