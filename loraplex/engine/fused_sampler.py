"""The CUDA sampling path: every sampled row of a step in one Triton launch.

``ops/sampling_triton.py`` draws each row by rejection sampling with a pivot over Gumbel-max
races, streaming the row from L2 a few times; the tensor-op path (``sampler.py``) launches
dozens of small kernels a step, which cost 1.5-2.3 ms on an H200 at any batch size. Here a
step is: the per-row parameters in one host -> device copy (pinned, reused buffers), a
``topk`` only when some row asks for top-k (its k-th logit is the threshold), and the launch.
Greedy rows keep the ``argmax`` the caller computed. The logits are already penalised
(``penalties.py`` runs before either sampler). Same order of operations and kept set
as ``sampler.py`` (temperature -> top-k -> top-p on the top-k distribution -> min-p); the
noise differs (Philox keyed on the same per-(seed, step) row key), so a seeded request draws
reproducibly on GPU, but not the same tokens as on CPU.
"""

from __future__ import annotations

import torch

from loraplex.engine import sampling_ops as ops
from loraplex.engine.sequence import Sequence
from loraplex.ops.sampling_triton import fused_sample


class FusedSampling:
    """``fused(logits [B, vocab] float32 CUDA, seqs, ids [B] int64)``: overwrite the sampled
    rows' ``ids`` in place (no host sync; the caller copies ``ids`` back)."""

    def __init__(self, device: torch.device, capacity: int = 64) -> None:
        self.device = device
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        # rows: temperature, top_p, min_p, top_k (as float) | keys
        pin = self.device.type == "cuda"  # (CPU: the kernel tests, under the interpreter)
        self._host_f = torch.empty(4, capacity, dtype=torch.float32, pin_memory=pin)
        self._host_k = torch.empty(capacity, dtype=torch.int64, pin_memory=pin)
        self._dev_f = torch.empty_like(self._host_f, device=self.device)
        self._dev_k = torch.empty_like(self._host_k, device=self.device)
        self._np_f, self._np_k = self._host_f.numpy(), self._host_k.numpy()
        self._no_top_k = torch.full((capacity,), float("-inf"), device=self.device)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence], ids: torch.Tensor) -> None:
        batch, vocab = logits.shape
        if batch > self.capacity:
            self._alloc(max(batch, 2 * self.capacity))
        temp, top_p, min_p, top_k, keys = [], [], [], [], []
        for seq in seqs:
            p = seq.params
            temp.append(p.temperature)
            top_p.append(p.top_p)
            min_p.append(p.min_p)
            top_k.append(p.top_k if 0 < p.top_k < vocab else -1)
            keys.append(ops.row_key(seq.seed or 0, len(seq.output_token_ids)))
        f = self._np_f
        f[0, :batch], f[1, :batch], f[2, :batch], f[3, :batch] = temp, top_p, min_p, top_k
        self._np_k[:batch] = keys
        self._dev_f[:, :batch].copy_(self._host_f[:, :batch], non_blocking=True)
        self._dev_k[:batch].copy_(self._host_k[:batch], non_blocking=True)
        dev = self._dev_f[:, :batch]
        kmax = max(top_k)
        if kmax > 0:  # the k-th largest logit of each top-k row is its threshold
            k = dev[3].to(torch.int64)
            vals = torch.topk(logits, kmax, dim=-1).values  # [B, kmax]
            kth = vals.gather(1, (k - 1).clamp_(0, kmax - 1)[:, None]).squeeze(1)
            kth = torch.where(k > 0, kth, float("-inf"))
        else:  # the common case allocates nothing: a reused -inf threshold row
            kth = self._no_top_k[:batch]
        fused_sample(logits, dev[0], dev[1], dev[2], kth.contiguous(), self._dev_k[:batch], ids)
