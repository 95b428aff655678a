"""Linear layers in the four kinds a tensor-parallel engine needs.

Column kinds (``ColumnLinear``, ``MergedColumnLinear`` for gate/up, ``QKVLinear``) split the
output features over a tensor-parallel group; ``RowLinear`` (o, down) splits the input features
and would all-reduce. The group size is a constructor argument (1 today) so tensor parallelism
is a new value, not a rewrite. Fused layers record their slices (``output_sizes``) so LoRA
wrappers and the checkpoint loader know where q/k/v or gate/up live.

On CPU the weights are prepacked once after loading (``prepack_linear_weights``): oneDNN's
blocked layout replaces the dense matrix, so a GEMM no longer repacks the whole weight on
every call. That repacking dominates small-M GEMMs: a decode step at batch 8-32 runs about
twice as fast, and prefill-sized GEMMs stay within a few percent of MKL. The dense copy is
dropped (the parameter keeps its shape and dtype on the meta device), so memory stays ~1x.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


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
        self.packed: torch.Tensor | None = None  # oneDNN layout, set by prepack()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def prepack(self) -> None:
        """Replace the dense CPU weight with its oneDNN-blocked copy (see the module doc)."""
        w = self.weight
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach())
        # A tied lm_head shares the embedding's Parameter: only this module lets go of it.
        self.weight = nn.Parameter(torch.empty_like(w, device="meta"), requires_grad=False)

    def load_shard(self, name: str, shard: str | None, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (``name`` is "weight" or "bias") into its slice."""
        assert self.packed is None, "weights are loaded before they are prepacked"
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
        packed = ", packed" if self.packed is not None else ""
        return (f"in={self.in_features}, out={self.output_sizes}, "
                f"bias={self.bias is not None}{packed}")


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
