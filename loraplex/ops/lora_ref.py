"""Reference for the batched LoRA ops: ``lora_shrink`` (x @ A^T) and ``lora_expand``
(y += scaling * h @ B^T), per segment of tokens that share one adapter slot. Written to be
obviously correct, not fast (tests and benchmarks compare the backends against it; the engine
runs ``lora_torch`` on CPU and ``lora_triton`` on GPU, with these signatures).

Layouts (see ``lora_meta``): for ``S`` slots, ``n`` stacked slices and ``R = max rank``,
``a [S, n*R, in]`` holds slice i's A in rows ``i*R : i*R + ranks[s, i]``, ``b [S, out, R]``
holds slice i's B in rows ``offsets[i] : offsets[i+1]``, columns ``: ranks[s, i]``.

Segments come from the batch's tensors (``seg_starts``, ``seg_lens``, ``seg_lora_slots``, the
first ``num_segs``), as the GPU kernels read them. Math is float64; each result is rounded once into
the output's dtype.
"""

from __future__ import annotations

import torch

from loraplex.ops.lora_meta import ColumnScales, LoRABatch


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
    for start, length, slot in _segments(batch):
        rows = slice(start, start + length)
        for i in range(n):
            r = int(ranks[slot, i])
            if r > 0:
                cols = slice(i * big_r, i * big_r + r)
                out[rows, cols] = (x[rows].double() @ a[slot, cols].double().T).to(out.dtype)


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
                    delta = scalings[slot, i] * (h[rows, i*R : i*R + r] @ b[slot, cols, :r].T)
                    if col_scales is not None and col_scales.flags[slot]:   # DoRA
                        y[rows, cols] = (y[rows, cols] * col_scales.scale[slot, cols]
                                         + col_scales.shift[slot, cols])
                    y[rows, cols] += delta

    The result is rounded once into y's dtype. Rows of ``slot == -1`` tokens are untouched.
    """
    n, big_r = ranks.shape[1], b.shape[2]
    assert len(offsets) == n + 1 and offsets[-1] == y.shape[1], (offsets, y.shape)
    for start, length, slot in _segments(batch):
        rows = slice(start, start + length)
        for i in range(n):
            r = int(ranks[slot, i])
            if r > 0:
                cols = slice(offsets[i], offsets[i + 1])
                hs = h[rows, i * big_r : i * big_r + r].double()  # [len, r]
                delta = float(scalings[slot, i]) * (hs @ b[slot, cols, :r].double().T)
                base = y[rows, cols].double()
                if col_scales is not None and int(col_scales.flags[slot]):
                    base = (base * col_scales.scale[slot, cols].double()
                            + col_scales.shift[slot, cols].double())
                y[rows, cols] = (base + delta).to(y.dtype)


def _segments(batch: LoRABatch) -> list[tuple[int, int, int]]:
    """(start, length, slot) of the batch's segments that use an adapter."""
    k = batch.num_segs
    starts, lens, slots = (t[:k].tolist() for t in (batch.seg_starts, batch.seg_lens,
                                                     batch.seg_lora_slots))
    return [(s, n, slot) for s, n, slot in zip(starts, lens, slots, strict=True) if slot >= 0]
