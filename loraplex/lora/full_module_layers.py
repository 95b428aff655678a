"""Replaced embedding / lm_head weights on the device, and the wrappers that serve them.

``FullModuleBuffers`` holds, allocated once, ``F = max_full_module_adapters`` full-module
slots: each an embedding copy ``embed [F, vocab, hidden]`` and an lm_head copy ``lm_head
[F, vocab, hidden]`` (memory ``2 * F * vocab * hidden * itemsize``, counted with the adapter
buffers before the KV cache is sized; on CPU with prepacked weights an lm_head copy is
packed in oneDNN's layout when written instead of kept in the dense pool). Which lora slot
holds which full-module slot is the slot pool's business (``pool.py``); here a lora slot
just points at the matrices its adapter uses. Trainable tokens need no full-module slot:
their rows are copied to the device when the adapter's lora slot is written (``n x hidden``,
small) with, for the embedding, a ``[vocab]`` map from token id to row.

The wrappers run after the wrapped module, per segment of the step's ``LoRABatch`` (rows are
sorted by lora slot, so one adapter's rows are contiguous):

    embedding (ids [T] -> y [T, hidden]), rows of lora slot s:
        full copy E_s:       y[rows] = E_s[ids[rows]]
        trainable tokens:    y[t] = rows_s[k] where ids[t] == tok_s[k], else unchanged
    lm_head (h [T, hidden] -> logits [T, vocab]), rows of lora slot s:
        full copy W_s:       logits[rows] = h[rows] @ W_s.T
        trainable tokens:    logits[rows][:, tok_s] = h[rows] @ rows_s.T

Rows with a full lm_head copy skip the base GEMM (the base runs over the other rows only)
and do one GEMM per segment with their copy; when the wrapped module is an lm_head LoRA
wrapper, which needs the batch of all rows, they pay its GEMM too. The work depends on
host-side segments, so a decode step with such rows runs eagerly, not from a CUDA graph
(``ModelRunner``); steps without them keep their graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.config import ModelConfig
from loraplex.layers.forward_context import _current
from loraplex.layers.linear import LinearBase
from loraplex.lora.full_modules import ReplacedModules, TokenRows


@dataclass
class _SlotWeights:
    """What one lora slot replaces (device tensors, or None)."""

    embed: torch.Tensor | None = None  # [vocab, hidden], a view of a full-module slot
    lm_head: torch.Tensor | None = None
    head_packed: bool = False  # lm_head is oneDNN-blocked (CPU prepacking), not [vocab, hidden]
    embed_map: torch.Tensor | None = None  # [vocab] int64: row index into embed_rows, or -1
    embed_rows: torch.Tensor | None = None  # [n, hidden]
    head_ids: torch.Tensor | None = None  # [n] int64
    head_rows: torch.Tensor | None = None  # [n, hidden]

    def any(self) -> bool:
        return any(t is not None for t in (self.embed, self.lm_head, self.embed_map,
                                           self.head_ids))


class FullModuleBuffers:
    def __init__(self, cfg: ModelConfig, num_lora_slots: int, num_full_slots: int,
                 dtype: torch.dtype, device: torch.device, prepack: bool = False) -> None:
        """``prepack``: the base linear weights are oneDNN-prepacked (CPU, layers/linear.py):
        lm_head copies are packed the same way when written (a dense small-M GEMM runs about
        half as fast), so they are not kept in a dense pool."""
        self.num_full_slots, self.vocab_size = num_full_slots, cfg.vocab_size
        self.dtype, self.device, self.prepack = dtype, device, prepack
        shape = (num_full_slots, cfg.vocab_size, cfg.hidden_size)
        self.embed = torch.zeros(shape, dtype=dtype, device=device)
        self.lm_head = None if prepack else torch.zeros(shape, dtype=dtype, device=device)
        self.slots = [_SlotWeights() for _ in range(num_lora_slots)]

    @property
    def nbytes(self) -> int:
        return 2 * self.embed.nbytes  # packed lm_head copies take about as much as dense ones

    def active(self, lora_slot: int) -> bool:
        """Whether rows of ``lora_slot`` need the wrappers (host state, no device sync)."""
        return lora_slot >= 0 and self.slots[lora_slot].any()

    def write(self, lora_slot: int, full_slot: int | None, rep: ReplacedModules | None) -> None:
        """Point ``lora_slot`` at its adapter's replaced weights, copying them in: full copies
        into ``full_slot`` (which the caller reserved), trainable tokens next to the slot."""
        w = _SlotWeights()
        if rep is not None:
            if rep.needs_full_slot:
                assert full_slot is not None, "a full copy needs a full-module slot"
            if rep.embed is not None:
                w.embed = self.embed[full_slot]
                w.embed.copy_(rep.embed)
            if rep.lm_head is not None and self.prepack:
                w.lm_head = torch.ops.mkldnn._reorder_linear_weight(rep.lm_head.to(self.dtype))
                w.head_packed = True
            elif rep.lm_head is not None and rep.lm_head is rep.embed:
                w.lm_head = w.embed  # PEFT's tied copy: one matrix for both
            elif rep.lm_head is not None:
                w.lm_head = self.lm_head[full_slot]
                w.lm_head.copy_(rep.lm_head)
            if rep.embed_rows is not None:
                w.embed_map, w.embed_rows = self._embed_rows(rep.embed_rows)
            if rep.lm_head_rows is not None:
                w.head_ids = rep.lm_head_rows.ids.to(self.device)
                w.head_rows = rep.lm_head_rows.rows.to(self.device, self.dtype)
        self.slots[lora_slot] = w

    def _embed_rows(self, r: TokenRows) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.full((self.vocab_size,), -1, dtype=torch.int64)
        index[r.ids] = torch.arange(len(r.ids))
        return index.to(self.device), r.rows.to(self.device, self.dtype)

    def clear(self, lora_slot: int) -> None:
        self.slots[lora_slot] = _SlotWeights()


def _segments(buffers: FullModuleBuffers):
    """The step's (start, end, slot weights) of segments whose adapter replaces something."""
    # not get_forward_batch(): logits may be computed outside any forward context (when no
    # slot replaces lm_head rows, the runner builds no batch for them)
    batch = _current.get()
    lora = None if batch is None else batch.lora
    if lora is None:
        return
    for start, n, slot in lora.host_segs:
        if buffers.active(slot):
            yield start, start + n, buffers.slots[slot]


class FullModuleEmbedding(nn.Module):
    """The input embedding (with its LoRA) plus per-slot replaced rows (see the module doc)."""

    def __init__(self, inner: nn.Module, buffers: FullModuleBuffers) -> None:
        super().__init__()
        self.inner, self.buffers = inner, buffers

    @property
    def weight(self) -> torch.Tensor:  # code that reads the embedding matrix keeps working
        return self.inner.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        y = self.inner(ids)
        for start, end, w in _segments(self.buffers):
            if w.embed is not None:
                y[start:end] = F.embedding(ids[start:end], w.embed)
            elif w.embed_map is not None:
                k = w.embed_map[ids[start:end]]  # [n] row of each token, -1: not trained
                new = w.embed_rows[k.clamp(min=0)]
                y[start:end] = torch.where((k >= 0).unsqueeze(1), new, y[start:end])
        return y


class FullModuleLMHead(nn.Module):
    """The lm_head (with its LoRA) plus per-slot replaced rows (see the module doc)."""

    @property
    def reads_lora_batch(self) -> bool:
        """Whether logits need their rows' LoRA batch (``logits_read_lora``): while some lora
        slot replaces lm_head rows, or the wrapped module (an lm_head LoRA) needs it; so
        engines without such adapters build none."""
        mine = any(w.lm_head is not None or w.head_ids is not None for w in self.buffers.slots)
        return mine or getattr(self.inner, "reads_lora_batch", False)

    def __init__(self, inner: nn.Module, buffers: FullModuleBuffers) -> None:
        super().__init__()
        self.inner, self.buffers = inner, buffers

    @property
    def weight(self) -> torch.Tensor:
        return self.inner.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        segs = list(_segments(self.buffers))
        full = [(start, end) for start, end, w in segs if w.lm_head is not None]
        if full and isinstance(self.inner, LinearBase):
            # the base GEMM only over the rows no copy replaces (a plain linear may run on any
            # subset of rows; an lm_head LoRA wrapper reads the batch of all of them)
            y = hidden.new_empty(hidden.shape[0], self.buffers.vocab_size)
            for start, end in _gaps(full, hidden.shape[0]):
                y[start:end] = self.inner(hidden[start:end])
        else:
            y = self.inner(hidden)
        for start, end, w in segs:
            if w.head_packed:
                y[start:end] = torch.ops.mkldnn._linear_pointwise(hidden[start:end], w.lm_head,
                                                                  None, "none", [], "")
            elif w.lm_head is not None:
                y[start:end] = F.linear(hidden[start:end], w.lm_head)
            elif w.head_ids is not None:
                y[start:end].index_copy_(1, w.head_ids, F.linear(hidden[start:end], w.head_rows))
        return y


def _gaps(ranges: list[tuple[int, int]], n: int) -> list[tuple[int, int]]:
    """The non-empty [start, end) runs of 0..n outside ``ranges`` (sorted, disjoint)."""
    out, pos = [], 0
    for start, end in ranges:
        if start > pos:
            out.append((pos, start))
        pos = end
    return out + [(pos, n)] if pos < n else out


def install_full_module_layers(model: nn.Module, buffers: FullModuleBuffers) -> None:
    """Wrap the model's input embedding and lm_head, outside their LoRA wrappers (an adapter
    never has both a copy and a LoRA of one module: PEFT puts no LoRA on a module it saves
    whole). Outermost, the lm_head wrapper answers ``reads_lora_batch`` for both."""
    embed = model.model.embed_tokens
    if isinstance(embed, FullModuleEmbedding):
        embed = embed.inner
    model.model.embed_tokens = FullModuleEmbedding(embed, buffers)
    head = model.lm_head
    if isinstance(head, FullModuleLMHead):
        head = head.inner
    model.lm_head = FullModuleLMHead(head, buffers)
