"""The torch backend of the batched LoRA ops: on CPU the fallback of the C backend
(``lora_cpu``: when it cannot be built, and for half precision), and on any device without
Triton. Same signatures and semantics as ``lora_ref`` (the semantics are written out
as PyTorch code there); this file is about doing it fast.

CPU (ranks on the host): one GEMM per (segment, slice), written straight into the
destination view with ``addmm_``, in the tensors' own dtype. No weight is copied, gathered or
widened: a segment's A/B are views of the pool, so scattered slots cost nothing more than
consecutive ones. Half-precision GEMMs accumulate in float32 inside ``addmm_`` and round
once into the output. Why not one ``bmm`` over many segments: on CPU, ``bmm`` over strided
pool views and ``baddbmm_`` into column slices of ``y`` take a slow path, several times slower
than the same work as a loop of ``addmm_``; ``mm(out=...)`` into a narrow column slice is
slower still. ``addmm_`` on the destination view is the fast, allocation-free form. Nor does
gathering the batch's A/B into scratch for one ``bmm`` per run of equal-length segments pay
(measured: slower at one and at two threads, prefill and decode; the copy costs what the
batched call saves).

What a call costs beyond its GEMMs is making views: a few microseconds each, as much as a
decode-sized GEMM, ~700 GEMMs a decode step. The transposed weight views are therefore made
once and kept in the batch (``_pool_views``), and each segment's slice views come from one
``split_with_sizes``.

Other devices (ranks on an accelerator): the ranks are never read on the host (no sync). All
``R`` columns are computed and the unused ones masked by a device-side comparison, so garbage
in unused rank columns never reaches the result; the sum is formed in float32 and rounded
once.

The only per-batch input read is ``batch.host_segs`` (segments that use an adapter, as host
``(start, length, slot)`` tuples), which the batch builder computes once per forward.
"""

from __future__ import annotations

import torch

from loraplex.ops.lora_meta import ColumnScales, LoRABatch


def lora_shrink(
    x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, batch: LoRABatch, out: torch.Tensor
) -> None:
    """``out[seg, i*R : i*R + r] = x[seg] @ a[slot, i*R : i*R + r].T`` per segment and slice
    (contract: ``lora_ref.lora_shrink``). ``x [T', in]``, ``a [S, n*R, in]``, ``ranks [S, n]``
    int32, ``out [T, n*R]``; x, a and out share one dtype."""
    assert x.dtype == a.dtype == out.dtype, (x.dtype, a.dtype, out.dtype)
    n = ranks.shape[1]
    big_r = a.shape[1] // n
    if ranks.device.type != "cpu":
        return _shrink_masked(x, a, ranks, batch, out)
    host_ranks = ranks.numpy().tolist()  # via numpy: a third of Tensor.tolist's cost
    views = _pool_views(batch, a)
    for start, length, slot in batch.host_segs:
        xs = x[start : start + length]  # [len, in]
        dst = out[start : start + length]  # [len, n*R]
        rk = host_ranks[slot]
        if all(r == big_r for r in rk):  # every slice at full rank: one GEMM, stacked rows
            a_t = views.get((slot, -1, 0))
            if a_t is None:
                a_t = views[(slot, -1, 0)] = a[slot].T  # [in, n*R]
            dst.addmm_(xs, a_t, beta=0)
            continue
        for i, r in enumerate(rk):
            if r:
                lo = i * big_r
                a_t = views.get((slot, i, r))
                if a_t is None:
                    a_t = views[(slot, i, r)] = a[slot, lo : lo + r].T  # [in, r]
                # beta=0: the destination's old contents (maybe NaN) are not read
                dst[:, lo : lo + r].addmm_(xs, a_t, beta=0)


def lora_expand(
    h: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    offsets: tuple[int, ...],
    batch: LoRABatch,
    y: torch.Tensor,
    col_scales: ColumnScales | None = None,
) -> None:
    """``y[seg, cols_i] += scalings[slot, i] * h[seg, i*R : i*R + r] @ b[slot, cols_i, :r].T``
    per segment and slice, in place (contract: ``lora_ref.lora_expand``). ``h [T, n*R]``,
    ``b [S, out, R]``, ``ranks [S, n]`` int32, ``scalings [S, n]`` float32, ``offsets`` n+1
    python ints, ``y [T', out]``; h, b and y share one dtype. ``col_scales`` (DoRA): flagged
    slots first map their base output ``y * scale + shift``."""
    assert h.dtype == b.dtype == y.dtype, (h.dtype, b.dtype, y.dtype)
    n = ranks.shape[1]
    assert len(offsets) == n + 1 and offsets[-1] == y.shape[1], (offsets, y.shape)
    if ranks.device.type != "cpu" or scalings.device.type != "cpu":
        return _expand_masked(h, b, ranks, scalings, offsets, batch, y, col_scales)
    big_r = b.shape[2]
    host_ranks, host_scalings = ranks.numpy().tolist(), scalings.numpy().tolist()
    # torch 2.13's CPU bfloat16 GEMM reads past the K extent of a column-sliced left operand
    # (from 16 or so rows on), so the unused rank columns of h would leak into y: give it
    # its [len, r] slice as a contiguous copy (activations only, a few KB; weights stay views).
    own_h = h.dtype == torch.bfloat16
    views = _pool_views(batch, b)
    # one split per segment makes all n slice views in one call (cheaper than n slicings)
    h_widths, y_widths = [big_r] * n, [offsets[i + 1] - offsets[i] for i in range(n)]
    dora = col_scales.host_flags if col_scales is not None else None
    for start, length, slot in batch.host_segs:
        hr, yr = h[start : start + length], y[start : start + length]  # [len, n*R], [len, out]
        h_parts = hr.split_with_sizes(h_widths, 1) if n > 1 else (hr,)  # [len, R] each
        y_parts = yr.split_with_sizes(y_widths, 1) if n > 1 else (yr,)  # [len, w_i] each
        for i, r in enumerate(host_ranks[slot]):
            if r:
                if dora is not None and dora[slot]:  # DoRA: rescale the base output first
                    scale_columns(y_parts[i], col_scales, slot, offsets[i], offsets[i + 1])
                b_t = views.get((slot, i, r))
                if b_t is None:
                    b_t = views[(slot, i, r)] = b[slot, offsets[i] : offsets[i + 1], :r].T
                hs = h_parts[i] if r == big_r else h_parts[i][:, :r]  # [len, r]
                y_parts[i].addmm_(hs.contiguous() if own_h else hs, b_t,
                                  alpha=host_scalings[slot][i])


def _pool_views(batch: LoRABatch, pool: torch.Tensor) -> dict[tuple[int, int, int], torch.Tensor]:
    """The batch's cache of transposed weight views of ``pool``, keyed ``(slot, slice, rank)``
    (slice -1: all slices stacked). Making a view costs a few microseconds of dispatch, as
    much as a decode-sized GEMM, and a decode step makes ~700 of them; the pool never moves and
    a reload only rewrites values, so a view stays valid and the key's rank tracks the width."""
    return batch.views.setdefault((pool.data_ptr(), pool.shape), {})


def scale_columns(ys: torch.Tensor, cs: ColumnScales, slot: int, c0: int, c1: int) -> None:
    # ys [len, w] a view of y: shift + y * scale in place, broadcast over the rows, in one
    # pass over y (mul_ then add_ would read and write it twice)
    torch.addcmul(cs.shift[slot, c0:c1], ys, cs.scale[slot, c0:c1], out=ys)


# -- ranks on an accelerator: no host sync, unused rank columns masked -------------------------


def _shrink_masked(x, a, ranks, batch: LoRABatch, out) -> None:
    n = ranks.shape[1]
    big_r = a.shape[1] // n
    col = torch.arange(big_r, device=ranks.device)
    for start, length, slot in batch.host_segs:
        rows = slice(start, start + length)
        xs = x[rows].float()  # [len, in]
        for i in range(n):
            lo = i * big_r
            keep = col < ranks[slot, i]  # [R]
            h = (xs @ a[slot, lo : lo + big_r].float().T).to(out.dtype)  # [len, R]
            dst = out[rows, lo : lo + big_r]
            dst.copy_(torch.where(keep, h, dst))


def _expand_masked(h, b, ranks, scalings, offsets, batch: LoRABatch, y,
                   col_scales: ColumnScales | None = None) -> None:
    n, big_r = ranks.shape[1], b.shape[2]
    col = torch.arange(big_r, device=ranks.device)
    for start, length, slot in batch.host_segs:
        rows = slice(start, start + length)
        for i in range(n):
            lo, c0, c1 = i * big_r, offsets[i], offsets[i + 1]
            keep = col < ranks[slot, i]  # [R]; mask both operands: NaN garbage stays out
            hs = torch.where(keep, h[rows, lo : lo + big_r].float(), 0.0)  # [len, R]
            bs = torch.where(keep, b[slot, c0:c1].float(), 0.0)  # [w_i, R]
            dst = y[rows, c0:c1]
            base = dst.float()
            if col_scales is not None:  # identity for unflagged slots (scale 1, shift 0)
                base = base * col_scales.scale[slot, c0:c1] + col_scales.shift[slot, c0:c1]
            dst.copy_((base + (hs @ bs.T) * scalings[slot, i]).to(dst.dtype))
