"""Device tensors of the paged KV cache: per layer, K and V of shape
[num_blocks, block_size, kv_heads, head_dim], with this tensor-parallel rank's kv heads
(``distributed/sharding.py``: ``kv / tp``, or one replicated head when kv < tp)."""

from __future__ import annotations

import torch

from loraplex.config import ModelConfig
from loraplex.distributed.parallel_state import tp_size
from loraplex.distributed.sharding import kv_bytes_per_block, kv_heads_per_rank


def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    return kv_bytes_per_block(cfg, block_size, itemsize, tp_size())


def allocate_kv_cache(
    cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    kv_heads = kv_heads_per_rank(cfg.num_kv_heads, cfg.num_heads, tp_size())
    shape = (num_blocks, block_size, kv_heads, cfg.head_dim)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(cfg.num_layers)
    ]
