"""The input embedding, split over the tensor-parallel group by vocabulary rows.

Rank r holds rows ``sharding.vocab_range(V, tp, r)`` (``ceil(V / tp)`` rows each, zero padding
past ``V``). A token outside a rank's rows contributes a zero vector there, so the all-reduce
of every rank's lookup is exactly ``E[ids]``. At size 1 this is ``nn.Embedding``'s lookup.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.distributed import parallel_state
from loraplex.distributed.sharding import vocab_per_rank, vocab_range
from loraplex.layers.linear import tensor_shape


class VocabParallelEmbedding(nn.Module):
    """ids [T] int64 -> [T, hidden]; ``weight`` is this rank's [ceil(V / tp), hidden] rows."""

    def __init__(self, num_embeddings: int, embedding_dim: int,
                 tp_size: int | None = None, tp_rank: int | None = None) -> None:
        super().__init__()
        self.tp_size = parallel_state.tp_size() if tp_size is None else tp_size
        self.tp_rank = parallel_state.tp_rank() if tp_rank is None else tp_rank
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.vocab_lo, self.vocab_hi = vocab_range(num_embeddings, self.tp_size, self.tp_rank)
        rows = vocab_per_rank(num_embeddings, self.tp_size)
        self.weight = nn.Parameter(torch.zeros(rows, embedding_dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_lo) | (ids >= self.vocab_hi)
        local = (ids - self.vocab_lo).masked_fill_(outside, 0)
        y = F.embedding(local, self.weight).masked_fill_(outside[:, None], 0)
        return parallel_state.all_reduce_(y)

    def load_shard(self, name: str, shard: str | None, tensor: Any) -> None:
        """This rank's rows of the checkpoint's full ``[V, hidden]`` matrix."""
        assert name == "weight" and shard is None
        expected = (self.num_embeddings, self.embedding_dim)
        if tensor_shape(tensor) != expected:
            raise ValueError(f"shape {tensor_shape(tensor)} != expected {expected}")
        n = self.vocab_hi - self.vocab_lo
        self.weight.data[:n].copy_(tensor[self.vocab_lo : self.vocab_hi])

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, "
                f"rows={self.vocab_lo}:{self.vocab_hi}")
