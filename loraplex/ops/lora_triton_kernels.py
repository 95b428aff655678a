"""Triton kernels behind ``lora_triton`` (launch them through its wrappers only).

Two shapes of work, each for shrink (h = x @ A^T) and expand (y += s * h @ B^T):
- *segment* kernels (prefill): grid (column tile, M tile, segment); tensor-core ``tl.dot``
  tiles over a segment's rows, K loop over ``in`` (shrink) or the rank (expand).
- *decode* kernels (few tokens per segment): grid (token, column tile); one token per
  program, CUDA-core multiply-and-reduce, no padded M rows.

Shared rules: slot -1 segments/tokens, rank-0 slices and column tiles past a slot's rank exit
before touching memory; every load is masked by the rows, the columns and the slot's rank,
so unused rank rows/columns are never read and any ``in``/``out`` width works. The stacked
A columns are addressed as one ``[n*R]`` axis: column c belongs to slice ``c // R`` and is
live when ``c % R < ranks[slot, c // R]``. Expand's column tiles never straddle slices:
axis 0 enumerates (slice, tile) with ``NB`` tiles per slice; slice bounds come from the
scalar offsets ``O0..O4`` (n <= 4). Accumulation is float32; stores cast to the output type.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _slice_bounds(sl, O0, O1, O2, O3, O4):
    lo = tl.where(sl == 0, O0, tl.where(sl == 1, O1, tl.where(sl == 2, O2, O3)))
    hi = tl.where(sl == 0, O1, tl.where(sl == 1, O2, tl.where(sl == 2, O3, O4)))
    return lo, hi


@triton.jit
def _live_columns(ranks_ptr, slot, cols, NR, R, N_SLICES):
    """[BLOCK] bool: stacked A columns (or h columns) that hold slot's live rank entries."""
    col_slice = cols // R
    col_rank = tl.load(ranks_ptr + slot * N_SLICES + col_slice, mask=cols < NR, other=0)
    return (cols - col_slice * R) < col_rank


@triton.jit
def shrink_segment_kernel(
    x_ptr, a_ptr, ranks_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr, out_ptr,
    K, NR, R, N_SLICES, stride_xm, stride_as, stride_an, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)  # fastest axis: tiles sharing x rows run together (L2 reuse)
    pid_m = tl.program_id(1)
    seg = tl.program_id(2)
    slot = tl.load(seg_slots_ptr + seg)
    length = tl.load(seg_lens_ptr + seg)
    if (slot < 0) | (pid_m * BLOCK_M >= length):
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = _live_columns(ranks_ptr, slot, cols, NR, R, N_SLICES)
    if tl.max(col_ok.to(tl.int32), axis=0) == 0:
        return
    start = tl.load(seg_starts_ptr + seg)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    tok = (start + rows).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    a_ptrs = a_ptr + slot.to(tl.int64) * stride_as + cols[None, :] * stride_an + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(xt, at, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    out_ptrs = out_ptr + tok[:, None] * stride_om + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def shrink_decode_kernel(
    x_ptr, a_ptr, ranks_ptr, token_slots_ptr, out_ptr,
    K, NR, R, N_SLICES, stride_xm, stride_as, stride_an, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    tok = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(token_slots_ptr + tok)
    if slot < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = _live_columns(ranks_ptr, slot, cols, NR, R, N_SLICES)
    if tl.max(col_ok.to(tl.int32), axis=0) == 0:
        return
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok.to(tl.int64) * stride_xm + offs_k  # [BK]
    a_ptrs = a_ptr + slot.to(tl.int64) * stride_as + cols[:, None] * stride_an + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # reduced once, after the K loop
    for k in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k
        xv = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        at = tl.load(a_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        acc += at * xv[None, :]
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    h = tl.sum(acc, axis=1)
    out_ptrs = out_ptr + tok.to(tl.int64) * stride_om + cols
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def expand_segment_kernel(
    h_ptr, b_ptr, ranks_ptr, scalings_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr, y_ptr,
    R, N_SLICES, NB, O0, O1, O2, O3, O4, stride_hm, stride_bs, stride_bn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)  # (slice, column tile within the slice)
    pid_m = tl.program_id(1)
    seg = tl.program_id(2)
    sl = pid // NB
    slot = tl.load(seg_slots_ptr + seg)
    length = tl.load(seg_lens_ptr + seg)
    if (slot < 0) | (pid_m * BLOCK_M >= length):
        return
    rank = tl.load(ranks_ptr + slot * N_SLICES + sl)
    lo, hi = _slice_bounds(sl, O0, O1, O2, O3, O4)
    col0 = lo + (pid % NB) * BLOCK_N
    if (rank == 0) | (col0 >= hi):
        return
    scale = tl.load(scalings_ptr + slot * N_SLICES + sl)
    start = tl.load(seg_starts_ptr + seg)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < length
    tok = (start + rows).to(tl.int64)
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < hi
    offs_r = tl.arange(0, BLOCK_R)
    h_ptrs = h_ptr + tok[:, None] * stride_hm + sl * R + offs_r[None, :]  # [BM, BR]
    b_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + cols[None, :] * stride_bn + offs_r[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, rank, BLOCK_R):
        r_ok = offs_r < rank - k
        ht = tl.load(h_ptrs, mask=row_ok[:, None] & r_ok[None, :], other=0.0)
        bt = tl.load(b_ptrs, mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # [BR, BN]
        acc = tl.dot(ht, bt, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_R
        b_ptrs += BLOCK_R
    mask = row_ok[:, None] & col_ok[None, :]
    y_ptrs = y_ptr + tok[:, None] * stride_ym + cols[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32) + acc * scale
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def expand_decode_kernel(
    h_ptr, b_ptr, ranks_ptr, scalings_ptr, token_slots_ptr, y_ptr,
    R, N_SLICES, NB, O0, O1, O2, O3, O4, stride_hm, stride_bs, stride_bn, stride_ym,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    tok = tl.program_id(0)
    pid = tl.program_id(1)  # (slice, column tile within the slice)
    sl = pid // NB
    slot = tl.load(token_slots_ptr + tok)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot * N_SLICES + sl)
    lo, hi = _slice_bounds(sl, O0, O1, O2, O3, O4)
    col0 = lo + (pid % NB) * BLOCK_N
    if (rank == 0) | (col0 >= hi):
        return
    scale = tl.load(scalings_ptr + slot * N_SLICES + sl)
    cols = col0 + tl.arange(0, BLOCK_N)
    col_ok = cols < hi
    offs_r = tl.arange(0, BLOCK_R)
    h_ptrs = h_ptr + tok.to(tl.int64) * stride_hm + sl * R + offs_r  # [BR]
    b_ptrs = b_ptr + slot.to(tl.int64) * stride_bs + cols[:, None] * stride_bn + offs_r[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for k in range(0, rank, BLOCK_R):
        r_ok = offs_r < rank - k
        hv = tl.load(h_ptrs, mask=r_ok, other=0.0).to(tl.float32)
        bt = tl.load(b_ptrs, mask=col_ok[:, None] & r_ok[None, :], other=0.0).to(tl.float32)
        acc += bt * hv[None, :]
        h_ptrs += BLOCK_R
        b_ptrs += BLOCK_R
    y_ptrs = y_ptr + tok.to(tl.int64) * stride_ym + cols
    y = tl.load(y_ptrs, mask=col_ok, other=0.0).to(tl.float32) + tl.sum(acc, axis=1) * scale
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=col_ok)
