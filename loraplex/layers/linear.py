"""Linear layers in the four kinds a tensor-parallel engine needs.

Column kinds (``ColumnLinear``, ``MergedColumnLinear`` for gate/up, ``QKVLinear``) split the
output features over the tensor-parallel group, each fused slice on its own (q by heads, k/v
by kv heads, replicated when there are fewer kv heads than ranks: ``distributed/sharding.py``);
their outputs stay sharded. ``RowLinear`` (o, down) splits the input features, all-reduces its
partial outputs and adds the bias once, after the reduce. The group (rank, size) is read from
``parallel_state`` at construction unless given. Fused layers record their local slices
(``output_sizes``) so LoRA wrappers and the checkpoint loader know where q/k/v or gate/up live.

Checkpoint tensors arrive whole or as lazy safetensors slices (``get_slice``); ``load_shard``
indexes out only this rank's rows (column kinds) or columns (row kinds), so a rank never reads
the rest of the tensor.

On CPU the weights are prepacked once after loading (``prepack_linear_weights``): oneDNN's
blocked layout replaces the dense matrix, so a GEMM no longer repacks the whole weight on
every call. That repacking dominates small-M GEMMs: a decode step at batch 8-32 runs about
twice as fast, and prefill-sized GEMMs stay within a few percent of MKL. The dense copy is
dropped (the parameter keeps its shape and dtype on the meta device), so memory stays ~1x.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.distributed.parallel_state import all_reduce_, tp_rank, tp_size
from loraplex.distributed.sharding import divide, kv_head_range, kv_heads_per_rank

logger = logging.getLogger(__name__)


def tensor_shape(t: Any) -> tuple[int, ...]:
    """Shape of a torch tensor or of a lazy safetensors slice (``get_shape()``)."""
    return tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t.get_shape())


def _group(tp_size_: int | None, tp_rank_: int | None) -> tuple[int, int]:
    return (tp_size() if tp_size_ is None else tp_size_,
            tp_rank() if tp_rank_ is None else tp_rank_)


class LinearBase(nn.Module):
    """``in_features`` / ``out_features`` / ``output_sizes``: this rank's sizes;
    ``full_output_sizes``: the checkpoint's."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False,
        tp_size: int | None = None, tp_rank: int | None = None,
    ) -> None:
        super().__init__()
        self.tp_size, self.tp_rank = _group(tp_size, tp_rank)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.output_sizes = [out_features]
        self.full_output_sizes = [out_features]
        self.packed: torch.Tensor | None = None  # oneDNN layout, set by prepack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
        return F.linear(x, self.weight, bias)

    def prepack(self) -> None:
        """Replace the dense CPU weight with its oneDNN-blocked copy (see the module doc)."""
        w = self.weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
        # A tied lm_head shares the embedding's Parameter: only this module lets go of it.
        self.weight = nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=False)

    def load_shard(self, name: str, shard: str | None, tensor: Any) -> None:
        """Copy this rank's part of one checkpoint tensor (``name`` is "weight" or "bias";
        ``tensor`` a torch tensor or a safetensors slice of the full, unsharded tensor) into
        its slice. Column kinds: the rows ``source_rows(shard)`` of the slice."""
        assert self.packed is None, "weights are loaded before they are prepacked"
        param = getattr(self, name)
        full = self.full_output_sizes[self._index(shard)]
        expected = (full, self.in_features) if name == "weight" else (full,)
        if tensor_shape(tensor) != expected:
            raise ValueError(f"shape {tensor_shape(tensor)} != expected {expected}")
        lo, hi = self.source_rows(shard)
        dst = self.shard_range(shard)[0]
        param.data[dst : dst + hi - lo].copy_(tensor[lo:hi])

    def _index(self, shard: str | None) -> int:
        assert shard is None
        return 0

    def shard_range(self, shard: str | None) -> tuple[int, int]:
        """The local output rows of slice ``shard``."""
        i = self._index(shard)
        lo = sum(self.output_sizes[:i])
        return lo, lo + self.output_sizes[i]

    def source_rows(self, shard: str | None) -> tuple[int, int]:
        """The rows of slice ``shard``'s checkpoint tensor this rank holds (even split; a
        short range leaves zero padding at the end of the local slice)."""
        i = self._index(shard)
        k, full = self.output_sizes[i], self.full_output_sizes[i]
        return min(self.tp_rank * k, full), min((self.tp_rank + 1) * k, full)

    def extra_repr(self) -> str:
        packed = ", packed" if self.packed is not None else ""
        tp = f", tp={self.tp_rank}/{self.tp_size}" if self.tp_size > 1 else ""
        return (f"in={self.in_features}, out={self.output_sizes}, "
                f"bias={self.bias is not None}{packed}{tp}")


class ColumnLinear(LinearBase):
    """Output features split over the TP group (the lm_head). ``out_features`` need not divide
    by the group: each rank holds ``ceil(out / tp)`` rows, zero past the real ones."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_size: int | None = None, tp_rank: int | None = None) -> None:
        size, rank = _group(tp_size, tp_rank)
        super().__init__(in_features, -(-out_features // size), bias, size, rank)
        self.full_output_sizes = [out_features]
        if self.out_features * size != out_features:  # padding rows: zero, never loaded
            self.weight.data.zero_()
            if self.bias is not None:
                self.bias.data.zero_()


class RowLinear(LinearBase):
    """Input features split over the TP group (o, down): each rank multiplies its columns of
    the weight, the partial outputs are all-reduced, then the bias is added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 tp_size: int | None = None, tp_rank: int | None = None) -> None:
        size, rank = _group(tp_size, tp_rank)
        super().__init__(divide(in_features, size, "a row-parallel layer's input features"),
                         out_features, bias, size, rank)
        self.full_in_features = in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._matmul(x, self.bias)
        y = all_reduce_(self._matmul(x, None))
        return y if self.bias is None else y.add_(self.bias)

    def load_shard(self, name: str, shard: str | None, tensor: Any) -> None:
        """The weight's columns ``in_range()``; the bias whole."""
        assert self.packed is None and shard is None
        param = getattr(self, name)
        expected = ((self.out_features, self.full_in_features) if name == "weight"
                    else (self.out_features,))
        if tensor_shape(tensor) != expected:
            raise ValueError(f"shape {tensor_shape(tensor)} != expected {expected}")
        lo, hi = self.in_range()
        param.data.copy_(tensor[:, lo:hi] if name == "weight" else tensor[:])

    def in_range(self) -> tuple[int, int]:
        k = self.in_features
        return self.tp_rank * k, (self.tp_rank + 1) * k


class MergedColumnLinear(LinearBase):
    """Several column projections of one input fused into one GEMM (gate_proj + up_proj);
    ``output_sizes`` are the full sizes, each split over the group on its own."""

    def __init__(
        self,
        in_features: int,
        output_sizes: list[int],
        shard_names: list[str],
        bias: bool = False,
        tp_size: int | None = None,
        tp_rank: int | None = None,
    ) -> None:
        size, rank = _group(tp_size, tp_rank)
        local = self.local_sizes(output_sizes, shard_names, size)
        super().__init__(in_features, sum(local), bias, size, rank)
        self.output_sizes = local
        self.full_output_sizes = list(output_sizes)
        self.shard_names = list(shard_names)

    def local_sizes(self, sizes: list[int], names: list[str], tp: int) -> list[int]:
        return [divide(n, tp, f"the output features of {name}") for n, name in zip(sizes, names)]

    def _index(self, shard: str | None) -> int:
        return self.shard_names.index(shard)


class QKVLinear(MergedColumnLinear):
    """q, k and v projections fused; with grouped-query attention k/v are narrower than q.
    Each rank holds its query heads and the kv heads they read (``sharding.kv_head_range``)."""

    def __init__(
        self,
        hidden: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp_size: int | None = None,
        tp_rank: int | None = None,
    ) -> None:
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden, [q, kv, kv], ["q", "k", "v"], bias, tp_size, tp_rank)

    def local_sizes(self, sizes: list[int], names: list[str], tp: int) -> list[int]:
        kv = kv_heads_per_rank(self.num_kv_heads, self.num_heads, tp) * self.head_dim
        return [divide(self.num_heads, tp, "num_attention_heads") * self.head_dim, kv, kv]

    def source_rows(self, shard: str | None) -> tuple[int, int]:
        if shard == "q":
            return super().source_rows(shard)
        lo, hi = kv_head_range(self.num_kv_heads, self.num_heads, self.tp_size, self.tp_rank)
        return lo * self.head_dim, hi * self.head_dim


def can_prepack(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``prepack_linear_weights`` applies: CPU, float32/bfloat16, oneDNN built in,
    and this CPU able to run oneDNN's kernels in ``dtype`` (bfloat16 needs AVX-512 BW/VL/DQ
    or AVX-NE-CONVERT: on an AVX2-only CPU the reorder raises, so those weights stay dense).
    """
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and _prepack_runs_on_this_cpu(dtype))


@functools.cache
def _prepack_runs_on_this_cpu(dtype: torch.dtype) -> bool:
    """Try the reorder and a packed GEMM once on a tiny weight; log once if this CPU can't."""
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=dtype))
        torch.ops.mkldnn._linear_pointwise(torch.ones(2, 8, dtype=dtype), packed, None,
                                           "none", [], "")
    except RuntimeError as exc:
        logger.warning("oneDNN cannot prepack %s linear weights on this CPU (%s, %s); using "
                    "dense weights", dtype, torch.backends.cpu.get_cpu_capability(),
                    str(exc).splitlines()[0])
        return False
    return True


def prepack_linear_weights(model: nn.Module) -> int:
    """Prepack every linear layer of a loaded CPU model; returns how many were packed."""
    layers = [m for m in model.modules() if isinstance(m, LinearBase) and m.packed is None]
    for m in layers:
        m.prepack()
    return len(layers)
