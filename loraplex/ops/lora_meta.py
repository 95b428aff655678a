"""The per-forward LoRA metadata every batched LoRA op reads.

Tokens of a batch are ordered so that each adapter's tokens are contiguous: a *segment* is a
run of tokens that use one lora slot (an index into the adapter weight buffers; KV-cache slots
are a different thing, ``slot_mapping``). Lora slot -1 means "no adapter" (the op leaves
those tokens untouched). ``lora.batch.LoRABatchBuilder`` fills these tensors in place every
step (preallocated, so CUDA graphs can capture them); only the first ``num_segs`` /
``num_tokens`` entries are valid.

Per (layer, projection) the adapter pool holds, for ``S`` slots and ``n`` stacked slices
(q/k/v: n=3, gate/up: n=2, o/down: n=1) and ``R = max_lora_rank``:
    a        [S, n*R, in]     slice i's A in rows i*R : i*R + rank[s, i]
    b        [S, out, R]      slice i's B in rows offsets[i] : offsets[i+1], cols : rank[s, i]
    ranks    [S, n] int32     0 = slice not targeted (skipped)
    scalings [S, n] float32
and, per output column, an optional ``ColumnScales`` (DoRA's magnitude over the column norm).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class LoRABatch:
    seg_starts: torch.Tensor  # [max_segs] int32, first token of each segment
    seg_lens: torch.Tensor  # [max_segs] int32
    seg_lora_slots: torch.Tensor  # [max_segs] int32, -1 = no adapter
    token_lora_slots: torch.Tensor  # [max_tokens] int32, slot of each token, -1 = no adapter
    num_segs: int
    num_tokens: int
    max_seg_len: int
    # Host copy of the segments that use an adapter: (start, length, lora_slot), in token
    # order, from ``segments`` (the one definition). Host-side backends loop over these
    # (work per distinct adapter, no device->host sync).
    host_segs: list[tuple[int, int, int]]
    # A decode step (one token per sequence): per-token kernels read only ``token_lora_slots``,
    # so a CUDA graph captured once replays for any adapter mix.
    is_decode: bool = False
    # CPU backend: transposed views of adapter-pool weights, per pool, kept across steps by the
    # builder's reused batch (``lora_torch._pool_views``).
    views: dict[tuple, dict[tuple[int, int, int], torch.Tensor]] = field(default_factory=dict)
    # CPU backend "cpu": ``host_segs`` cut into per-thread work items, kept with the list
    # they were cut from (the builder makes a new list every step: ``lora_cpu._work_items``).
    work_items: tuple | None = None
    # and with the rows without an adapter added (``lora_cpu._activation_items``)
    activation_items: tuple | None = None

    @property
    def decode_shaped(self) -> bool:
        """Decode step or few tokens per segment: per-token kernels waste no tiles."""
        return self.is_decode or self.max_seg_len <= 4

    @classmethod
    def from_token_slots(cls, slots: list[int], device: torch.device | str = "cpu") -> LoRABatch:
        """Build from a per-token lora slot list (tests, benchmarks). Runs of equal slots form
        segments; the list need not be sorted."""
        segs = segments(slots, [1] * len(slots))
        i32 = dict(dtype=torch.int32, device=device)
        return cls(
            seg_starts=torch.tensor([s[0] for s in segs], **i32),
            seg_lens=torch.tensor([s[1] for s in segs], **i32),
            seg_lora_slots=torch.tensor([s[2] for s in segs], **i32),
            token_lora_slots=torch.tensor(slots, **i32),
            num_segs=len(segs),
            num_tokens=len(slots),
            max_seg_len=max((s[1] for s in segs), default=0),
            host_segs=[s for s in segs if s[2] >= 0],
        )


@dataclass
class ColumnScales:
    """A per-slot affine map of a projection's base output, applied by ``lora_expand`` before
    it adds the LoRA delta (DoRA: ``scale = magnitude / ||W + s*B@A||`` per output row of W,
    ``shift = (1 - scale) * bias``, and B already multiplied by ``scale`` row-wise)::

        y[seg, cols_i] = y[seg, cols_i] * scale[slot, cols_i] + shift[slot, cols_i] + delta

    for slots with ``flags[slot] != 0`` and slices with rank > 0. Other slots' rows get the
    plain ``y += delta``. ``scale`` is 1 and ``shift`` 0 wherever no DoRA adapter writes, so
    a backend may also apply it to unflagged slots (exactly the identity).
    """

    scale: torch.Tensor  # [S, out] float32
    shift: torch.Tensor  # [S, out] float32
    flags: torch.Tensor  # [S] int32, on the op's device: 1 = the slot scales this projection
    host_flags: list[bool]  # the same on the host (host-side backends read it, no sync)


def segments(lora_slots: list[int], lengths: list[int]) -> list[tuple[int, int, int]]:
    """The one definition of a segment: ``(start, length, lora_slot)`` per maximal run of
    consecutive rows with the same lora slot, given row groups (e.g. sequences) in batch order
    with ``lengths[i]`` tokens on ``lora_slots[i]`` (-1 = no adapter). Semantics::

        token_slot = [s for s, n in zip(lora_slots, lengths) for _ in range(n)]
        # split token_slot wherever the value changes; zero-length groups vanish

    Every LoRA op backend reads segments from here (``LoRABatch.host_segs`` on the host)."""
    segs: list[tuple[int, int, int]] = []
    pos = 0
    for slot, n in zip(lora_slots, lengths, strict=True):
        if n <= 0:
            continue
        if segs and segs[-1][2] == slot:
            start, m, _ = segs[-1]
            segs[-1] = (start, m + n, slot)
        else:
            segs.append((pos, n, slot))
        pos += n
    return segs
