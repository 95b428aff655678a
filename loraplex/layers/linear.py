"""Linear layers in the four kinds a tensor-parallel engine needs.

Column kinds (``ColumnLinear``, ``MergedColumnLinear`` for gate/up, ``QKVLinear``) split the
output features over a tensor-parallel group; ``RowLinear`` (o, down) splits the input features
and would all-reduce. The group size is a constructor argument (1 today) so tensor parallelism
is a new value, not a rewrite. Fused layers record their slices (``output_sizes``) so LoRA
wrappers and the checkpoint loader know where q/k/v or gate/up live.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LinearBase(nn.Module):
    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, tp_size: int = 1
    ) -> None:
        super().__init__()
        assert tp_size == 1, "tensor parallelism is planned, not implemented"
        self.in_features, self.out_features, self.tp_size = in_features, out_features, tp_size
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.output_sizes = [out_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def load_shard(self, name: str, shard: str | None, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (``name`` is "weight" or "bias") into its slice."""
        param = getattr(self, name)
        lo, hi = self.shard_range(shard)
        if tuple(tensor.shape) != (hi - lo, *param.shape[1:]):
            raise ValueError(
                f"shape {tuple(tensor.shape)} != expected {(hi - lo, *param.shape[1:])}"
            )
        param.data[lo:hi].copy_(tensor)

    def shard_range(self, shard: str | None) -> tuple[int, int]:
        assert shard is None
        return 0, self.out_features

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.output_sizes}, bias={self.bias is not None}"


class ColumnLinear(LinearBase):
    """Output features split over the TP group (lm_head-like projections)."""


class RowLinear(LinearBase):
    """Input features split over the TP group; the partial outputs are all-reduced (o, down)."""


class MergedColumnLinear(LinearBase):
    """Several column projections of one input fused into one GEMM (gate_proj + up_proj)."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        shard_names: list[str],
        bias: bool = False,
        tp_size: int = 1,
    ) -> None:
        super().__init__(in_features, sum(output_sizes), bias, tp_size)
        self.output_sizes = list(output_sizes)
        self.shard_names = list(shard_names)

    def shard_range(self, shard: str | None) -> tuple[int, int]:
        i = self.shard_names.index(shard)
        lo = sum(self.output_sizes[:i])
        return lo, lo + self.output_sizes[i]


class QKVLinear(MergedColumnLinear):
    """q, k and v projections fused; with grouped-query attention k/v are narrower than q."""

    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp_size: int = 1,
    ) -> None:
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden, [q, kv, kv], ["q", "k", "v"], bias, tp_size)
