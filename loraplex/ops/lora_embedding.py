"""The shrink half of an embedding's LoRA: a gather of A's columns for the batch's tokens.

PEFT's embedding LoRA is ``y += scaling * A.T[ids] @ B.T`` with ``A [r, vocab]`` and ``B
[hidden, r]``: the linear-layer LoRA on one-hot tokens, so ``x @ A.T`` becomes a gather and
the expand half is the ordinary ``lora_expand`` (any backend) on ``B``.
"""

from __future__ import annotations

import torch

from loraplex.ops.lora_meta import LoRABatch


def lora_embedding_shrink(
    ids: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, batch: LoRABatch, out: torch.Tensor
) -> None:
    """``ids [T'] int64``, ``a [S, R, vocab]``, ``ranks [S, 1]`` int32, ``out [T, >= R]`` in a's
    dtype. Semantics (``lora_shrink`` with ``x = one_hot(ids)``)::

        for start, length, slot in segments:            # slot >= 0 only
            r = ranks[slot, 0]
            rows = slice(start, start + length)
            out[rows, :r] = a[slot, :r, ids[rows]].T

    Ranks on the host (CPU): exactly that, per segment. Ranks on a device: one gather over
    every token with no host sync (so a CUDA graph can hold it); rows of slot -1 tokens and
    columns past a slot's rank then hold values ``lora_expand`` never reads.
    """
    assert a.dtype == out.dtype, (a.dtype, out.dtype)
    if ranks.device.type == "cpu":
        host_ranks = ranks[:, 0].tolist()
        for start, length, slot in batch.host_segs:
            r = host_ranks[slot]
            if r:
                rows = slice(start, start + length)
                out[rows, :r] = a[slot, :r].index_select(1, ids[rows]).T
        return
    _gather_every_token(ids, a, batch, out)


def _gather_every_token(ids, a, batch: LoRABatch, out) -> None:
    t = min(batch.token_lora_slots.shape[0], ids.shape[0], out.shape[0])
    slots = batch.token_lora_slots[:t].clamp(min=0).long()
    out[:t, : a.shape[1]] = a[slots, :, ids[:t]]  # [t, R]
