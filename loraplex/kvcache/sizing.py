"""How many KV blocks the engine allocates.

On CUDA the cache takes what is left of ``gpu_memory_utilization`` of the device once this
engine's weights, adapter pool (full-module slots included) and the activations of its
largest step are accounted for:

    kv_bytes = total * utilization - in_use_at_peak - graph_reserve

``in_use_at_peak`` is measured, not estimated: after the weights and the adapter pool are
allocated, one profiled forward runs the largest step the engine will ever run (a prefill of
``max(max_num_batched_tokens, max_model_len)`` tokens as ``max_model_len``-long dummy
sequences, through the LoRA path when adapters are possible, then the ``[max_num_seqs,
vocab]`` logits and a sampler's softmax/sort over them). It is this engine's allocations at
the peak (``torch.cuda.max_memory_allocated`` less what other engines in the process held
before it) plus the memory outside torch's allocator (CUDA context, workspaces, other
processes; from ``mem_get_info``). So the fraction is per engine, as in vLLM: two engines at
0.45 share a GPU. A budget larger than the memory actually free is an error, not an OOM later.

``graph_reserve``: CUDA graphs are captured after the KV cache exists, into a private memory
pool that the profile cannot see. What stays allocated there is each captured graph's
``[bs, vocab]`` float32 logits (two graphs per size: with and without LoRA) plus the
intermediates of the largest decode step; the reserve is those logits plus
``GRAPH_RESERVE_BYTES`` for the intermediates, cuBLAS's per-stream workspaces and the
kernels loaded after the profile. On an H200 (tiny model, ``max_num_seqs=8``) a reserve of
256 MiB left the process 0.87 GB over its budget after the first decode step
(``test_cuda_engines_stay_within_their_gpu_memory_utilization``): the reserve is 1.5 GiB,
about 1% of that GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from loraplex.config import DEFAULT_CPU_KV_BYTES, CacheConfig
from loraplex.errors import CapacityError

logger = logging.getLogger(__name__)

GRAPH_RESERVE_BYTES = 3 << 29  # 1.5 GiB, see above


def kv_cache_bytes(total: int, utilization: float, peak_in_use: int, reserve: int = 0) -> int:
    """Bytes left for the KV cache: ``int(total * utilization) - peak_in_use - reserve``
    (negative when the budget is already spent; the caller turns that into an error)."""
    return int(total * utilization) - peak_in_use - reserve


def cuda_graph_reserve(batch_sizes: Iterable[int], vocab_size: int) -> int:
    """Memory the decode graphs keep after capture: float32 logits ``[bs, vocab]`` for every
    captured size, with and without LoRA, plus ``GRAPH_RESERVE_BYTES``."""
    return GRAPH_RESERVE_BYTES + 2 * sum(batch_sizes) * vocab_size * 4


def profile_lengths(max_num_batched_tokens: int, max_model_len: int) -> list[int]:
    """Sequence lengths of the largest prefill step: ``max_model_len``-long sequences filling
    the token budget (a prompt longer than the budget runs alone, so at least one full-length
    sequence)."""
    left = max(max_num_batched_tokens, max_model_len)
    lengths = []
    while left > 0:
        lengths.append(min(max_model_len, left))
        left -= lengths[-1]
    return lengths


@dataclass(frozen=True)
class MemorySplit:
    """Where device memory goes, in bytes (logged at start-up)."""

    weights: int
    adapters: int
    activations: int = 0  # peak of the profiled step above the weights and adapters
    other: int = 0  # outside torch's allocator: CUDA context, workspaces, other processes
    graph_reserve: int = 0
    kv: int = 0
    # full-module slots (embedding / lm_head copies, modules_to_save): allocated with the
    # adapter buffers, so the profile's peak includes them like those
    full_modules: int = 0


class Profile(NamedTuple):
    in_use: int  # bytes this engine holds at its peak, plus memory outside torch's allocator
    activations: int  # of which: the profiled step's activations
    free: int  # bytes free on the device after the step's memory was released


def measure_peak(run_step: Callable[[], None], device: torch.device,
                 others: int = 0) -> Profile:
    """Run ``run_step`` once on ``device``. ``others``: bytes that torch had allocated for
    other engines in this process before this engine's weights (not this engine's)."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    outside = max(0, (total - free) - torch.cuda.memory_reserved(device))
    torch.cuda.empty_cache()  # the profile's activations must not stay cached
    free = torch.cuda.mem_get_info(device)[0]
    return Profile(peak - others + outside, peak - before, free)


def num_kv_blocks(
    cache: CacheConfig,
    bytes_per_block: int,
    max_model_len: int,
    device: torch.device,
    split: MemorySplit,
    profile: Callable[[], Profile] | None = None,
    graph_reserve: int = 0,
) -> int:
    """Blocks for sequences (one more is allocated for CUDA-graph padding rows).

    ``profile`` (CUDA only) is ``measure_peak`` over the engine's largest step; it is skipped
    when the user gave ``num_blocks`` or ``kv_cache_memory_bytes``. Raises ``CapacityError``
    when the budget does not hold one sequence of ``max_model_len`` tokens, or is more than
    the device has free."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if cache.kv_cache_memory_bytes is not None:
        budget, source = cache.kv_cache_memory_bytes, "kv_cache_memory_bytes"
    elif device.type == "cuda" and profile is not None:
        prof = profile()
        total = torch.cuda.mem_get_info(device)[1]
        budget = kv_cache_bytes(total, cache.gpu_memory_utilization, prof.in_use, graph_reserve)
        split = replace(split, activations=prof.activations,
                        other=(prof.in_use - split.weights - split.adapters - split.full_modules
                               - prof.activations),
                        graph_reserve=graph_reserve)
        source = (f"gpu_memory_utilization={cache.gpu_memory_utilization} of "
                  f"{_gib(total)} GiB")
        if budget > prof.free - graph_reserve:
            raise CapacityError(
                f"{source} leaves {_gib(budget)} GiB for the KV cache, but only "
                f"{_gib(prof.free - graph_reserve)} GiB are free (other engines or processes "
                f"hold the rest): lower gpu_memory_utilization (--gpu-memory-utilization) "
                f"or set kv_cache_memory_bytes (--kv-cache-memory)")
    else:
        budget, source = DEFAULT_CPU_KV_BYTES, "the CPU default"
    blocks = max(0, budget) // bytes_per_block - 1  # the padding block comes out of the budget
    needed = -(-max_model_len // cache.block_size)
    if blocks < needed:
        raise CapacityError(
            f"the KV cache ({source}) has room for {max(blocks, 0) * cache.block_size} tokens, "
            f"less than one sequence of max_model_len={max_model_len} tokens "
            f"({needed * bytes_per_block / 2**20:.0f} MiB); raise gpu_memory_utilization "
            f"(--gpu-memory-utilization), lower max_model_len (--max-model-len), or set "
            f"kv_cache_memory_bytes (--kv-cache-memory) / num_kv_blocks (--num-kv-blocks)")
    split = replace(split, kv=(blocks + 1) * bytes_per_block)
    logger.info("KV cache: %d blocks x %d = %d tokens (sized from %s); memory GiB: weights %s, "
                "adapters %s, full-module slots %s, activations peak %s, other %s, CUDA-graph "
                "reserve %s, KV %s",
                blocks, cache.block_size, blocks * cache.block_size, source,
                *(_gib(x) for x in (split.weights, split.adapters, split.full_modules,
                                    split.activations, split.other, split.graph_reserve,
                                    split.kv)))
    return blocks


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f}"
