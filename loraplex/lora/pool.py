"""Device slots for adapter weights: buffers allocated once, per layer and fused projection.

For a fused projection with ``n`` slices (q/k/v: 3, gate/up: 2, o/down: 1), ``S`` slots and
``R = max_lora_rank``:
    a        [S, n*R, in]   slice i's A in rows i*R : i*R + rank
    b        [S, out, R]    slice i's B in rows offsets[i] : offsets[i+1], columns : rank
    ranks    [S, n] int32   0 = slice not targeted by the adapter in that slot
    scalings [S, n] float32
Rank columns beyond a slot's rank are never read, so loading an adapter writes only its own
rows/columns and clearing a slot only zeroes its ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.config import ModelConfig
from loraplex.lora.adapter import LoRAAdapter

# fused module -> the HF projections stacked in it, in order
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


@dataclass
class SlotBuffers:
    a: torch.Tensor
    b: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    offsets: tuple[int, ...]  # output column offsets of the slices, len n + 1


class LoRAPool:
    def __init__(
        self,
        cfg: ModelConfig,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_slots, self.max_rank = num_slots, max_rank
        shapes = cfg.proj_shapes()
        self.buffers: dict[tuple[int, str], SlotBuffers] = {}
        for layer in range(cfg.num_layers):
            for fused, projs in FUSED_PROJECTIONS.items():
                in_f = shapes[projs[0]][0]
                outs = [shapes[p][1] for p in projs]
                offsets = tuple(sum(outs[:i]) for i in range(len(outs) + 1))
                n = len(projs)
                self.buffers[(layer, fused)] = SlotBuffers(
                    a=torch.zeros(num_slots, n * max_rank, in_f, dtype=dtype, device=device),
                    b=torch.zeros(num_slots, offsets[-1], max_rank, dtype=dtype, device=device),
                    ranks=torch.zeros(num_slots, n, dtype=torch.int32, device=device),
                    scalings=torch.zeros(num_slots, n, dtype=torch.float32, device=device),
                    offsets=offsets,
                )

    @property
    def nbytes(self) -> int:
        return sum(b.a.nbytes + b.b.nbytes for b in self.buffers.values())

    def write(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy an adapter's weights into ``slot`` (replacing whatever was there)."""
        assert adapter.max_rank <= self.max_rank
        self.clear(slot)
        R = self.max_rank
        for (layer, fused), buf in self.buffers.items():
            for i, proj in enumerate(FUSED_PROJECTIONS[fused]):
                w = adapter.weights.get((layer, proj))
                if w is None:
                    continue
                r = w.a.shape[0]
                buf.a[slot, i * R : i * R + r].copy_(w.a)
                buf.b[slot, buf.offsets[i] : buf.offsets[i + 1], :r].copy_(w.b)
                buf.ranks[slot, i] = r
                buf.scalings[slot, i] = w.scaling

    def clear(self, slot: int) -> None:
        for buf in self.buffers.values():
            buf.ranks[slot].zero_()
            buf.scalings[slot].zero_()
