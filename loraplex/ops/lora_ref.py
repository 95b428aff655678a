"""Torch reference for the batched LoRA ops: ``lora_shrink`` (x @ A^T) and ``lora_expand``
(y += scaling * h @ B^T), applied per segment of tokens that share one adapter slot.

Layouts (see ``lora_meta``): for ``S`` slots, ``n`` stacked slices and ``R = max rank``,
``a [S, n*R, in]`` holds slice i's A in rows ``i*R : i*R + ranks[s, i]``, ``b [S, out, R]``
holds slice i's B in rows ``offsets[i] : offsets[i+1]``, columns ``: ranks[s, i]``.

The reference does one matmul per (segment, slice), never per token, and never copies
weights (slices are views). It reads segments from ``batch.host_segs`` so it never syncs:
with ``ranks`` on the CPU it also reads ranks on the host and slices exactly ``r`` rows; with
``ranks`` on an accelerator it computes all ``R`` columns and masks the unused ones by a
device-side comparison (so garbage in unused rank columns never reaches the result).
Accumulation is in float32; outputs are stored in the input dtype.
"""

from __future__ import annotations

import torch

from loraplex.ops.lora_meta import LoRABatch


def lora_shrink(
    x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, batch: LoRABatch, out: torch.Tensor
) -> None:
    """Project tokens onto their adapter's A (the "shrink" half of LoRA), per segment.

    Shapes: ``x [T', in]`` (T' >= batch.num_tokens), ``a [S, n*R, in]``, ``ranks [S, n]``
    int32, ``out [T, n*R]`` in x's dtype (T >= the rows the segments cover). Semantics::

        n = ranks.shape[1]; R = a.shape[1] // n
        for start, length, slot in segments:            # slot >= 0 only
            for i in range(n):
                r = ranks[slot, i]
                if r > 0:
                    rows = slice(start, start + length)
                    out[rows, i*R : i*R + r] = x[rows] @ a[slot, i*R : i*R + r].T

    Columns past ``r`` and rows of ``slot == -1`` tokens are not written.
    """
    n = ranks.shape[1]
    big_r = a.shape[1] // n
    host_ranks = _host_list(ranks)
    col = None if host_ranks is not None else torch.arange(big_r, device=ranks.device)
    for start, length, slot in batch.host_segs:
        xs = _f32(x[start : start + length])  # [len, in]
        if host_ranks is not None and all(r == big_r for r in host_ranks[slot]):
            # Every slice at full rank: one GEMM over the stacked rows.
            out[start : start + length] = (xs @ _f32(a[slot]).T).to(out.dtype)  # [len, n*R]
            continue
        for i in range(n):
            lo = i * big_r
            if host_ranks is not None:
                r = host_ranks[slot][i]
                if r > 0:
                    h = xs @ _f32(a[slot, lo : lo + r]).T  # [len, r]
                    out[start : start + length, lo : lo + r] = h.to(out.dtype)
                continue
            # Device ranks: all R columns, unused ones masked (no host sync).
            keep = col < ranks[slot, i]  # [R]
            h = (xs @ _f32(a[slot, lo : lo + big_r]).T).to(out.dtype)  # [len, R]
            dst = out[start : start + length, lo : lo + big_r]
            dst.copy_(torch.where(keep, h, dst))


def lora_expand(
    h: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    offsets: tuple[int, ...],
    batch: LoRABatch,
    y: torch.Tensor,
) -> None:
    """Add each token's LoRA delta ``scaling * h @ B^T`` into ``y`` in place, per segment.

    Shapes: ``h [T, n*R]`` (from ``lora_shrink``), ``b [S, out, R]``, ``ranks [S, n]`` int32,
    ``scalings [S, n]`` float32, ``offsets`` n+1 python ints with ``offsets[-1] == out``,
    ``y [T', out]`` in h's dtype. Semantics::

        for start, length, slot in segments:            # slot >= 0 only
            rows = slice(start, start + length)
            for i in range(n):
                r = ranks[slot, i]
                if r > 0:
                    cols = slice(offsets[i], offsets[i + 1])
                    y[rows, cols] += scalings[slot, i] * (
                        h[rows, i*R : i*R + r] @ b[slot, cols, :r].T)

    The sum is formed in float32 and rounded once into y's dtype. Rows of ``slot == -1``
    tokens are untouched.
    """
    n = ranks.shape[1]
    big_r = b.shape[2]
    assert len(offsets) == n + 1 and offsets[-1] == y.shape[1], (offsets, y.shape)
    host_ranks, host_scalings = _host_list(ranks), _host_list(scalings)
    on_host = host_ranks is not None and host_scalings is not None
    col = None if on_host else torch.arange(big_r, device=ranks.device)
    for start, length, slot in batch.host_segs:
        for i in range(n):
            lo, c0, c1 = i * big_r, offsets[i], offsets[i + 1]
            dst = y[start : start + length, c0:c1]  # [len, w_i] view
            if on_host:
                r = host_ranks[slot][i]
                if r == 0:
                    continue
                hs = _f32(h[start : start + length, lo : lo + r])  # [len, r]
                bs = _f32(b[slot, c0:c1, :r])  # [w_i, r]
                scale = host_scalings[slot][i]
                if dst.dtype == torch.float32:  # CPU fast path: one in-place GEMM
                    dst.addmm_(hs, bs.T, alpha=scale)
                    continue
            else:
                keep = col < ranks[slot, i]  # [R]; mask both operands: NaN garbage stays out
                hs = torch.where(keep, _f32(h[start : start + length, lo : lo + big_r]), 0.0)
                bs = torch.where(keep, _f32(b[slot, c0:c1]), 0.0)
                scale = scalings[slot, i]
            delta = (hs @ bs.T) * scale  # [len, w_i] float32
            dst.copy_((dst.float() + delta).to(dst.dtype))


def _host_list(t: torch.Tensor) -> list | None:
    """``t`` as nested lists when that costs no device sync (CPU tensors), else None."""
    return t.tolist() if t.device.type == "cpu" else None


def _f32(t: torch.Tensor) -> torch.Tensor:
    # No copy for float32 inputs (the CPU fast path); half types are widened per segment.
    return t if t.dtype == torch.float32 else t.float()
