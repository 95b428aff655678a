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
    if host_ranks is not None and x.dtype == out.dtype == torch.float32:
        return _shrink_runs(x, a, host_ranks, batch, out)
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
    if on_host and h.dtype == y.dtype == torch.float32:
        return _expand_runs(h, b, host_ranks, host_scalings, offsets, batch, y)
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


# -- CPU float32: runs of adapters batched into one bmm ---------------------------------------
# Segments sorted by slot often use consecutive slots with equal lengths and ranks (a decode
# step over distinct adapters: one token each). Such a run is one strided view of the pool
# (``a[s0:s0+k]``), so one bmm replaces k matmuls: the same bytes read, k times fewer ops.


def _runs(batch: LoRABatch, host_ranks: list[list[int]]) -> list[tuple[int, int, int, int]]:
    """Maximal runs (start, length, first slot, k) of segments with consecutive slots,
    contiguous tokens, equal lengths and equal per-slice ranks."""
    runs: list[list[int]] = []
    for start, length, slot in batch.host_segs:
        if runs:
            s0, ln, first, k = runs[-1]
            if (slot == first + k and length == ln and start == s0 + k * ln
                    and host_ranks[slot] == host_ranks[first]):
                runs[-1][3] += 1
                continue
        runs.append([start, length, slot, 1])
    return [tuple(r) for r in runs]


def _shrink_runs(x, a, host_ranks, batch: LoRABatch, out) -> None:
    n = len(host_ranks[0]) if host_ranks else 1
    big_r = a.shape[1] // n
    for start, length, first, k in _runs(batch, host_ranks):
        rows = slice(start, start + k * length)
        xs = x[rows].view(k, length, -1)  # [k, len, in]
        rk = host_ranks[first]
        if all(r == big_r for r in rk):  # every slice at full rank: the stacked rows at once
            h = torch.bmm(xs, a[first : first + k].transpose(1, 2))  # [k, len, n*R]
            out[rows] = h.view(k * length, -1)
            continue
        for i, r in enumerate(rk):
            if r:
                lo = i * big_r
                h = torch.bmm(xs, a[first : first + k, lo : lo + r].transpose(1, 2))
                out[rows, lo : lo + r] = h.view(k * length, r)


def _expand_runs(h, b, host_ranks, host_scalings, offsets, batch: LoRABatch, y) -> None:
    big_r = b.shape[2]
    for start, length, first, k in _runs(batch, host_ranks):
        rows = slice(start, start + k * length)
        for i, r in enumerate(host_ranks[first]):
            if not r:
                continue
            c0, c1 = offsets[i], offsets[i + 1]
            hs = h[rows, i * big_r : i * big_r + r].view(k, length, r)
            scales = [host_scalings[first + j][i] for j in range(k)]
            alpha = scales[0]
            if any(sc != alpha for sc in scales):  # per-adapter scaling folded into h
                hs = hs * torch.tensor(scales, dtype=hs.dtype).view(k, 1, 1)
                alpha = 1.0
            bt = b[first : first + k, c0:c1, :r].transpose(1, 2)  # [k, r, w_i]
            if length == 1 and c1 - c0 != y.shape[1]:
                # Decode into a column slice: baddbmm_ on the strided view falls back to one
                # addmm_ per adapter; a bmm into a fresh [k, 1, w_i] and one add_ is 1.4-2.8x
                # faster (the same bits: y + alpha * (h @ B^T)).
                y[rows, c0:c1].add_(torch.bmm(hs, bt).view(k, c1 - c0), alpha=alpha)
            else:
                y[rows, c0:c1].view(k, length, c1 - c0).baddbmm_(hs, bt, alpha=alpha)


def _host_list(t: torch.Tensor) -> list | None:
    """``t`` as nested lists when that costs no device sync (CPU tensors), else None."""
    return t.tolist() if t.device.type == "cpu" else None


def _f32(t: torch.Tensor) -> torch.Tensor:
    # No copy for float32 inputs (the CPU fast path); half types are widened per segment.
    return t if t.dtype == torch.float32 else t.float()
