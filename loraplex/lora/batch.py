"""The per-forward LoRA metadata builder: lora slots per sequence -> the reused ``LoRABatch``.

The only producer of batch metadata in the engine (segments come from ``lora_meta.segments``).
Metadata lives in one int32 buffer (host staging, pinned on CUDA) copied to the device in one
transfer; the ``LoRABatch`` fields are views of it, the same tensors every step, so CUDA graphs
captured on them replay for any adapter mix.
"""

from __future__ import annotations

import numpy as np
import torch

from loraplex.ops.lora_meta import LoRABatch, segments


class LoRABatchBuilder:
    def __init__(self, max_tokens: int, num_lora_slots: int, device: torch.device) -> None:
        self.max_tokens, max_segs = max_tokens, num_lora_slots + 1  # batches sorted by slot
        n = 3 * max_segs + max_tokens
        self._host = torch.empty(n, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._dev = self._host if device.type == "cpu" else torch.empty(n, dtype=torch.int32,
                                                                         device=device)
        h, d = self._host, self._dev
        views = [(h[i * max_segs : (i + 1) * max_segs], d[i * max_segs : (i + 1) * max_segs])
                 for i in range(3)] + [(h[3 * max_segs :], d[3 * max_segs :])]
        self._np = [v[0].numpy() for v in views]  # host views, fast to fill
        self.batch = LoRABatch(views[0][1], views[1][1], views[2][1], views[3][1], 0, 0, 0, [])

    def prepare(self, lora_slots: list[int], lengths: list[int], is_decode: bool = False,
                pad_to: int = 0) -> LoRABatch:
        """Fill the reused LoRABatch for sequences already sorted by lora slot (-1 = no
        adapter), ``lengths[i]`` tokens each. ``pad_to``: token rows past the batch up to this
        count get slot -1 (CUDA-graph padding). Host work is a few numpy slice writes, then
        one host->device copy."""
        segs = segments(lora_slots, lengths)
        starts, lens, seg_lora_slots, tok = self._np
        k, pos = len(segs), sum(lengths)
        assert pos <= self.max_tokens and k <= len(starts)
        table = np.asarray(segs, dtype=np.int32).reshape(k, 3)
        starts[:k], lens[:k], seg_lora_slots[:k] = table[:, 0], table[:, 1], table[:, 2]
        tok[:pos] = np.repeat(table[:, 2], table[:, 1])
        if pad_to > pos:
            tok[pos:pad_to] = -1
        if self._dev is not self._host:
            self._dev.copy_(self._host, non_blocking=True)
        b = self.batch
        b.num_segs, b.num_tokens, b.is_decode = k, pos, is_decode
        b.max_seg_len = int(table[:, 1].max()) if k else 0
        b.host_segs = [seg for seg in segs if seg[2] >= 0]
        return b
