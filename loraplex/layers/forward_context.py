"""The per-step metadata of one forward pass, installed by a context manager.

Layers that need step metadata (attention, LoRA wrappers) read it with ``get_forward_batch()``
instead of taking it as an argument, so model files stay plain and LoRA enters by module swap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from loraplex.layers.prefill_groups import PrefillGroup
from loraplex.ops.lora_meta import LoRABatch
from loraplex.ops.paged_attention_torch import decode_attention_bias
from loraplex.ops.paged_prefill_torch import ExtendPlan


@dataclass
class ExtendRows:
    """The rows of a mixed step that attend over the KV cache (``paged_prefill_attention``):
    a prefill chunk after a cached prefix (an earlier chunk or a prefix-cache hit), or a
    decode token. Their own K/V are written to the cache before attention reads it.

    ``tokens``: [Te] int64, which of the step's tokens are theirs, back to back (None: all
    of them). Row b owns ``tokens[cu_seqlens_q[b]:cu_seqlens_q[b+1]]`` and has
    ``context_lens[b]`` cached tokens including the chunk, behind ``block_tables[b]``.
    """

    tokens: torch.Tensor | None
    cu_seqlens_q: torch.Tensor  # [Be + 1] int64 on the device
    cu_seqlens_q_host: list[int]
    block_tables: torch.Tensor  # [Be, W] int64
    context_lens: torch.Tensor  # [Be] int64
    max_query_len: int
    max_context_len: int
    context_lens_host: list[int] | None = None  # the same lengths on the host
    # the torch backend's layout of these rows, filled by the first layer and shared by the
    # rest (each rebuilt it: index tensors, table gathers and masks per group per layer)
    torch_plan: ExtendPlan = field(default_factory=ExtendPlan, repr=False)


@dataclass
class ForwardBatch:
    """Everything a forward needs besides token ids and positions.

    Prefill: ``cu_seqlens`` (host list, len B+1) delimits each sequence's tokens; attention is
    causal within a sequence, reads no cached context, and runs as ``prefill_groups`` (built
    from ``cu_seqlens`` by ``plan_prefill``). A mixed step (chunked prefill, prefix-cache
    hits) is a prefill whose ``extend`` rows read the cache instead, and whose
    ``prefill_groups`` cover only the rows with no cached prefix. Decode: one token per sequence;
    attention reads ``context_lens[b]`` cached tokens through ``block_tables``, which may be
    wider than any context (the static CUDA-graph buffers are max_model_len wide):
    ``max_context_len``, when the host knows it, bounds the columns attention looks at.
    """

    is_prefill: bool
    num_tokens: int
    slot_mapping: torch.Tensor | None  # [T] int64, KV cache slot per token; None = don't cache
    cu_seqlens: list[int] | None = None  # prefill
    prefill_groups: list[PrefillGroup] | None = None  # prefill
    extend: ExtendRows | None = None  # prefill: rows with a cached prefix
    block_tables: torch.Tensor | None = None  # decode: [B, max_blocks] int64
    context_lens: torch.Tensor | None = None  # decode: [B] int64, incl. the new token
    # decode: host bound on context_lens (None: the table's full width, e.g. under capture)
    max_context_len: int | None = None
    attn_backend: str = "auto"  # paged attention backend (ops/paged_attention.py)
    lora: LoRABatch | None = None  # None: no request in the batch uses an adapter
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (k, v)
    _decode_mask: torch.Tensor | None = field(default=None, repr=False)

    def decode_block_tables(self, block_size: int) -> torch.Tensor:
        """Decode: ``block_tables`` cut to the blocks ``max_context_len`` tokens span (a view):
        what a backend whose work grows with the table's width (torch) should be given."""
        tables = self.block_tables
        if self.max_context_len is None:
            return tables
        return tables[:, : min(tables.shape[1], -(-self.max_context_len // block_size))]

    def decode_mask(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """Decode: [B, 1, 1, length] additive mask, 0 over each sequence's ``context_lens``
        cached tokens and -inf past them. Built by the first layer that asks and shared by the
        rest; a batch object lives for one forward, so it never outlives its context_lens.
        (8 layers of attention at batch 32 took 1.03-1.07x as long with a mask per layer,
        ``benchmarks/bench_cpu_parts.py`` (b).)"""
        if self._decode_mask is None or self._decode_mask.shape[-1] != length:
            self._decode_mask = decode_attention_bias(self.context_lens, length, dtype)
        return self._decode_mask


_current: ContextVar[ForwardBatch | None] = ContextVar("loraplex_forward_batch", default=None)


@contextlib.contextmanager
def forward_context(batch: ForwardBatch) -> Iterator[ForwardBatch]:
    token = _current.set(batch)
    try:
        yield batch
    finally:
        _current.reset(token)


def current_forward_batch() -> ForwardBatch | None:
    """The installed batch, or None outside ``forward_context()``."""
    return _current.get()


def get_forward_batch() -> ForwardBatch:
    batch = _current.get()
    assert batch is not None, "model forward called outside forward_context()"
    return batch
