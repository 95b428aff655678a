"""Device buffers for adapter weights: allocated once, per layer and fused projection.

For a fused projection with ``n`` slices (q/k/v: 3, gate/up: 2, o/down: 1), ``S`` lora slots and
``R = max_lora_rank``:
    a        [S, n*R, in]   slice i's A in rows i*R : i*R + rank
    b        [S, out, R]    slice i's B in rows offsets[i] : offsets[i+1], columns : rank
    ranks    [S, n] int32   0 = slice not targeted by the adapter in that slot
    scalings [S, n] float32
    col_scales               DoRA's per-slot column scale/shift [S, out] (identity elsewhere)
The input embedding has one more set (``embedding``), as a linear layer on one-hot tokens:
``a [S, R, vocab]`` (PEFT's lora_embedding_A), ``b [S, hidden, R]``, n = 1. With
``lm_head=True`` the output projection has one too (``lm_head``): ``a [S, R, hidden]``,
``b [S, vocab, R]`` (under TP this rank's padded vocabulary rows), n = 1, no DoRA
(``col_scales`` None); ``lm_head`` is None otherwise, since B alone is vocab x R per slot
(128k x 64 x 8 slots x 2 bytes = 128 MiB).
Rank columns beyond a slot's rank are never read, so loading an adapter writes only its own
rows/columns and clearing a slot only zeroes its ranks.

Under tensor parallelism (``distributed/parallel_state``, read at construction) a rank's
buffers hold only its shards, as S-LoRA and vLLM split them: column kinds (q/k/v, gate/up) keep
A whole and hold B's rows of this rank's output slice (per q/k/v and gate/up slice, with the
GQA kv-head replication of ``distributed/sharding.py``); row kinds (o, down) hold A's columns
of this rank's input slice and B whole. ``write`` takes the full adapter and cuts the shards.
The embedding's A and B stay whole on every rank (the delta is added after the embedding's
all-reduce, identically everywhere).

Which adapter a slot holds, and who pins it, is the slot pool's business (``pool.py``); this
file only moves weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.config import ModelConfig
from loraplex.distributed.parallel_state import tp_rank, tp_size
from loraplex.distributed.sharding import ProjShard, proj_shards, vocab_per_rank, vocab_range
from loraplex.lora.adapter import EMBED, EMBED_LAYER, LM_HEAD, LoRAAdapter, LoRAWeights
from loraplex.ops.lora_meta import ColumnScales

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
    # DoRA; scale 1 / shift 0 wherever no DoRA adapter wrote (None: no DoRA here, lm_head)
    col_scales: ColumnScales | None


def _identity_scales(num_slots: int, out: int, device: torch.device) -> ColumnScales:
    # float32 whatever the serving dtype: a scale multiplies the base output once, in the epilogue
    return ColumnScales(scale=torch.ones(num_slots, out, device=device),
                        shift=torch.zeros(num_slots, out, device=device),
                        flags=torch.zeros(num_slots, dtype=torch.int32, device=device),
                        host_flags=[False] * num_slots)


class LoRABuffers:
    def __init__(
        self,
        cfg: ModelConfig,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        staged: bool | None = None,
        lm_head: bool = False,
    ) -> None:
        """``staged``: copy through the per-layer staging buffers (default: on CUDA only;
        tests force it on CPU to check the packing). ``lm_head``: allocate the lm_head LoRA
        buffers (``enable_lm_head_lora``)."""
        self.num_slots, self.max_rank, self.dtype, self.device = num_slots, max_rank, dtype, device
        self.num_layers = cfg.num_layers
        # this rank's slice of each projection, in full coordinates
        self.shards: dict[str, ProjShard] = proj_shards(cfg, tp_size(), tp_rank())
        self.buffers: dict[tuple[int, str], SlotBuffers] = {}
        for layer in range(cfg.num_layers):
            for fused, projs in FUSED_PROJECTIONS.items():
                in_f = self.shards[projs[0]].shape[0]
                outs = [self.shards[p].shape[1] for p in projs]
                offsets = tuple(sum(outs[:i]) for i in range(len(outs) + 1))
                n = len(projs)
                self.buffers[(layer, fused)] = SlotBuffers(
                    a=torch.zeros(num_slots, n * max_rank, in_f, dtype=dtype, device=device),
                    b=torch.zeros(num_slots, offsets[-1], max_rank, dtype=dtype, device=device),
                    ranks=torch.zeros(num_slots, n, dtype=torch.int32, device=device),
                    scalings=torch.zeros(num_slots, n, dtype=torch.float32, device=device),
                    offsets=offsets,
                    col_scales=_identity_scales(num_slots, offsets[-1], device),
                )
        self.embedding = SlotBuffers(
            a=torch.zeros(num_slots, max_rank, cfg.vocab_size, dtype=dtype, device=device),
            b=torch.zeros(num_slots, cfg.hidden_size, max_rank, dtype=dtype, device=device),
            ranks=torch.zeros(num_slots, 1, dtype=torch.int32, device=device),
            scalings=torch.zeros(num_slots, 1, dtype=torch.float32, device=device),
            offsets=(0, cfg.hidden_size),
            col_scales=_identity_scales(num_slots, cfg.hidden_size, device),
        )
        # lm_head is vocabulary-parallel under TP: B keeps this rank's (padded) vocab rows,
        # like the base lm_head's shard, so the delta joins the local logits before the gather
        vocab_rows = vocab_per_rank(cfg.vocab_size, tp_size())
        self.lm_head_rows = vocab_range(cfg.vocab_size, tp_size(), tp_rank())
        self.lm_head = None if not lm_head else SlotBuffers(
            a=torch.zeros(num_slots, max_rank, cfg.hidden_size, dtype=dtype, device=device),
            b=torch.zeros(num_slots, vocab_rows, max_rank, dtype=dtype, device=device),
            ranks=torch.zeros(num_slots, 1, dtype=torch.int32, device=device),
            scalings=torch.zeros(num_slots, 1, dtype=torch.float32, device=device),
            offsets=(0, vocab_rows),
            col_scales=None,
        )
        self.lm_head_slots: set[int] = set()  # slots whose adapter has an lm_head LoRA
        self.embedding_slots: set[int] = set()  # ... and an embed_tokens LoRA
        # On CUDA a slot load goes through pinned host buffers, each big enough for one layer
        # of a max-rank adapter: one host->device copy per layer. Two of them alternate, so
        # packing layer k+1 on the host overlaps layer k's transfer.
        self._staging: list[tuple[torch.Tensor, torch.Tensor, torch.cuda.Event | None]] = []
        cuda = device.type == "cuda"
        if staged if staged is not None else cuda:
            per_layer = max(
                sum(b.a[0].numel() + b.b[0].numel() for (lay, _), b in self.buffers.items()
                    if lay == layer)
                for layer in range(cfg.num_layers)
            )
            self._staging = [(torch.empty(per_layer, dtype=dtype, pin_memory=cuda),
                              torch.empty(per_layer, dtype=dtype, device=device),
                              torch.cuda.Event() if cuda else None) for _ in range(2)]
        self.num_transfers = 0  # host->device copies of packed layers (staged writes)

    def all_buffers(self) -> list[SlotBuffers]:
        head = [self.lm_head] if self.lm_head is not None else []
        return [*self.buffers.values(), self.embedding, *head]

    @property
    def nbytes(self) -> int:
        return sum(b.a.nbytes + b.b.nbytes + (0 if b.col_scales is None else
                                              b.col_scales.scale.nbytes + b.col_scales.shift.nbytes)
                   for b in self.all_buffers())

    def write(self, lora_slot: int, adapter: LoRAAdapter) -> None:
        """Copy an adapter's weights into ``lora_slot`` (replacing whatever was there).
        ``adapter`` is whole (as loaded); this rank's shards are cut here."""
        assert adapter.max_rank <= self.max_rank
        R = self.max_rank
        for layer in range(self.num_layers):
            # (host source, device destination) pairs of this layer, in one fixed order
            pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
            for fused, projs in FUSED_PROJECTIONS.items():
                buf = self.buffers[(layer, fused)]
                ranks = torch.zeros(len(projs), dtype=torch.int32)
                scalings = torch.zeros(len(projs), dtype=torch.float32)
                for i, proj in enumerate(projs):
                    w = adapter.weights.get((layer, proj))
                    if w is None:
                        continue
                    r, sh = w.rank, self.shards[proj]
                    pairs.append((w.a[:, sh.in_lo : sh.in_hi], buf.a[lora_slot, i * R : i * R + r]))
                    pairs.append((w.b[sh.out_lo : sh.out_hi],
                                  buf.b[lora_slot, buf.offsets[i] : buf.offsets[i + 1], :r]))
                    ranks[i], scalings[i] = r, w.scaling
                buf.ranks[lora_slot].copy_(ranks)
                buf.scalings[lora_slot].copy_(scalings)
                self._write_col_scales(buf, lora_slot, [adapter.weights.get((layer, p))
                                                        for p in projs],
                                       [self.shards[p] for p in projs])
            self._copy_layer(layer, pairs)
        self._write_embedding(lora_slot, adapter.weights.get((EMBED_LAYER, EMBED)))
        head = adapter.weights.get((EMBED_LAYER, LM_HEAD))
        assert head is None or self.lm_head is not None, "lm_head LoRA needs lm_head=True"
        if self.lm_head is not None:
            self._write_direct(self.lm_head, lora_slot, head, self.lm_head_rows)
            (self.lm_head_slots.add if head is not None else self.lm_head_slots.discard)(
                lora_slot)

    def _write_embedding(self, lora_slot: int, w: LoRAWeights | None) -> None:
        self._write_direct(self.embedding, lora_slot, w)
        (self.embedding_slots.add if w is not None else self.embedding_slots.discard)(lora_slot)

    @staticmethod
    def _write_direct(buf: SlotBuffers, lora_slot: int, w: LoRAWeights | None,
                      b_rows: tuple[int, int] | None = None) -> None:
        """``b_rows``: the rows of B this rank keeps (lm_head's vocabulary shard; the padding
        rows past them stay zero)."""
        # Copied directly, not staged: the embedding's A [r, vocab] and lm_head's B [vocab, r]
        # are larger than a layer's staging buffer.
        r = 0 if w is None else w.rank
        if w is not None:
            buf.a[lora_slot, :r].copy_(w.a)
            b = w.b if b_rows is None else w.b[b_rows[0]:b_rows[1]]
            buf.b[lora_slot, : b.shape[0], :r].copy_(b)
        buf.ranks[lora_slot, 0] = r
        buf.scalings[lora_slot, 0] = 0.0 if w is None else w.scaling

    @staticmethod
    def _write_col_scales(buf: SlotBuffers, lora_slot: int, weights: list,
                          shards: list[ProjShard] | None = None) -> None:
        """DoRA's column scale/shift of each slice (this rank's output columns of it, from
        ``shards``) into the slot; identity where none."""
        cs = buf.col_scales
        if cs is None:
            return  # no DoRA on this module (lm_head)
        dora = any(w is not None and w.col_scale is not None for w in weights)
        if not dora and not cs.host_flags[lora_slot]:
            return  # identity already (a plain adapter replacing a plain one)
        cs.scale[lora_slot].fill_(1.0)
        cs.shift[lora_slot].zero_()
        for i, w in enumerate(weights):
            if w is not None and w.col_scale is not None:
                c0, c1 = buf.offsets[i], buf.offsets[i + 1]
                lo, hi = shards[i].out_lo, shards[i].out_hi
                cs.scale[lora_slot, c0:c1].copy_(w.col_scale[lo:hi])
                if w.col_shift is not None:
                    cs.shift[lora_slot, c0:c1].copy_(w.col_shift[lo:hi])
        cs.flags[lora_slot] = int(dora)
        cs.host_flags[lora_slot] = dora

    def _copy_layer(self, layer: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        if not self._staging:  # host memory: copy straight into the slot
            for src, dst in pairs:
                dst.copy_(src)
            return
        if not pairs:
            return
        # Pack the layer into a pinned buffer, send it in one transfer, then split it on the
        # device (device-local copies are cheap; host->device transfers are not).
        host, dev, done = self._staging[layer % 2]
        if done is not None:
            done.synchronize()  # the transfer that last read this pinned buffer has finished
        sizes = [src.numel() for src, _ in pairs]
        total = sum(sizes)
        torch.cat([src.reshape(-1) for src, _ in pairs], out=host[:total])
        dev[:total].copy_(host[:total], non_blocking=True)
        self.num_transfers += 1
        start = 0
        for (src, dst), n in zip(pairs, sizes):
            dst.copy_(dev[start : start + n].view(src.shape))
            start += n
        if done is not None:
            done.record()

    def clear(self, lora_slot: int) -> None:
        self.lm_head_slots.discard(lora_slot)
        self.embedding_slots.discard(lora_slot)
        for buf in self.all_buffers():
            buf.ranks[lora_slot].zero_()
            buf.scalings[lora_slot].zero_()
            self._write_col_scales(buf, lora_slot, [])
