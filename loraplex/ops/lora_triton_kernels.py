"""Triton kernels behind ``lora_triton`` (launch them through its wrappers only).

Two shapes of work, each for shrink (h = x @ A^T) and expand (y += s * h @ B^T):
- *segment* kernels (prefill): grid (column tile, M tile, segment); tensor-core ``tl.dot``
  tiles over a segment's rows, K loop over ``in`` (shrink) or the rank (expand).
- *decode* kernels (few tokens per segment): grid (token, column tile[, K chunk]); one token
  per program, CUDA-core multiply-and-reduce, no padded M rows.

Shrink is split-K (``SPLIT_K`` programs per output tile, each over one ``K_CHUNK`` of ``in``;
``SPLIT_BOUND`` is a power of two >= SPLIT_K, 1 for no split)
when the grid would otherwise be too small to pull HBM bandwidth: each program writes its
float32 partial tile into a workspace, and the last of a tile's programs to arrive (an atomic
counter per tile) sums the partials in split order (deterministic), stores the tile into
``out`` in its dtype and resets the counter to 0 for the next launch. One launch, no
allocation, ``out`` written exactly as without split-K.

Shared rules: slot -1 segments/tokens, rank-0 slices and column tiles past a slot's rank exit
before touching memory; every load is masked by the rows, the columns and the slot's rank,
so unused rank rows/columns are never read and any ``in``/``out`` width works. The stacked
A columns are addressed as one ``[n*R]`` axis: column c belongs to slice ``c // R`` and is
live when ``c % R < ranks[slot, c // R]``. Expand's column tiles never straddle slices:
one program axis enumerates exactly the (slice, tile) pairs, slice i owning
``cdiv(O[i+1] - O[i], BLOCK_N)`` tiles; slice bounds come from the scalar offsets ``O0..O4``
(n <= 4, unused slices have width 0). Accumulation is float32; stores cast to the output type.
Expand's epilogue applies a DoRA slot's ``ColumnScales`` to the loaded base output (flag
read per program, so a CUDA graph replays for any mix of DoRA and plain adapters).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _slice_tile(pid, O0, O1, O2, O3, O4, BLOCK_N: tl.constexpr):
    """Program ``pid`` of the (slice, column tile) axis -> (slice, first column, slice end)."""
    c1 = tl.cdiv(O1 - O0, BLOCK_N)
    c2 = c1 + tl.cdiv(O2 - O1, BLOCK_N)
    c3 = c2 + tl.cdiv(O3 - O2, BLOCK_N)
    sl = (pid >= c1).to(tl.int32) + (pid >= c2).to(tl.int32) + (pid >= c3).to(tl.int32)
    lo = tl.where(sl == 0, O0, tl.where(sl == 1, O1, tl.where(sl == 2, O2, O3)))
    hi = tl.where(sl == 0, O1, tl.where(sl == 1, O2, tl.where(sl == 2, O3, O4)))
    first = tl.where(sl == 0, 0, tl.where(sl == 1, c1, tl.where(sl == 2, c2, c3)))
    return sl, lo + (pid - first) * BLOCK_N, hi


@triton.jit
def _store_tile(part, out_ptr, out_ptrs, mask, ws_ptr, counts_ptr, tile, ks, SPLIT_K, ws_offs,
                TILE: tl.constexpr, SPLIT_BOUND: tl.constexpr):
    """Store the float32 partial tile ``part`` (K chunk ``ks`` of output tile ``tile``).
    ``SPLIT_BOUND`` 1 (no split-K): straight into ``out``. Else (a power of two >= SPLIT_K)
    into workspace slot ``[tile, ks]``; the SPLIT_K-th program of the tile to arrive sums
    slots 0..SPLIT_K-1 in order, stores the sum and resets the tile's counter (so the next
    launch, or graph replay, starts at 0). The sum is unrolled over SPLIT_BOUND masked loads,
    so they are all in flight at once (a runtime loop would pay one L2 round trip each)."""
    if SPLIT_BOUND == 1:
        tl.store(out_ptrs, part.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        base = ws_ptr + tile.to(tl.int64) * SPLIT_K * TILE + ws_offs
        tl.store(base + ks * TILE, part)
        tl.debug_barrier()  # all threads' partials are written before the release below
        arrived = tl.atomic_add(counts_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.load(base, cache_modifier=".cg")  # L2: written by other SMs
            for s in tl.static_range(1, SPLIT_BOUND):
                live = ws_offs + s * TILE < SPLIT_K * TILE  # s < SPLIT_K, as a tile
                total += tl.load(base + s * TILE, mask=live, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(counts_ptr + tile, 0)


@triton.jit
def _live_columns(ranks_ptr, slot, cols, NR, R, N_SLICES):
    """[BLOCK] bool: stacked A columns (or h columns) that hold slot's live rank entries."""
    col_slice = cols // R
    col_rank = tl.load(ranks_ptr + slot * N_SLICES + col_slice, mask=cols < NR, other=0)
    return (cols - col_slice * R) < col_rank


@triton.jit
def _column_scales(cs_ptr, csh_ptr, slot, cols, col_ok, stride_cs):
    """[BLOCK_N] float32 scale and shift of ``slot``'s output columns (``ColumnScales``)."""
    off = slot.to(tl.int64) * stride_cs + cols
    return (tl.load(cs_ptr + off, mask=col_ok, other=1.0),
            tl.load(csh_ptr + off, mask=col_ok, other=0.0))


@triton.jit
def shrink_segment_kernel(
    x_ptr, a_ptr, ranks_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr, out_ptr, ws_ptr,
    counts_ptr, K, K_CHUNK, SPLIT_K, NR, R, N_SLICES, stride_xm, stride_as, stride_an,
    stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SPLIT_BOUND: tl.constexpr,
):
    pid_n = tl.program_id(0)  # fastest axis: tiles sharing x rows run together (L2 reuse)
    pid_m = tl.program_id(1)
    seg = tl.program_id(2) // SPLIT_K
    ks = tl.program_id(2) % SPLIT_K  # K chunk
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
    k_lo = ks * K_CHUNK
    k_hi = tl.minimum(K, k_lo + K_CHUNK)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok[:, None] * stride_xm + (k_lo + offs_k)[None, :]  # [BM, BK]
    a_ptrs = (a_ptr + slot.to(tl.int64) * stride_as + cols[None, :] * stride_an
              + (k_lo + offs_k)[:, None])  # [BK, BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        k_ok = offs_k < k_hi - k
        xt = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)  # [BK, BN]
        acc = tl.dot(xt, at, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    out_ptrs = out_ptr + tok[:, None] * stride_om + cols[None, :]
    tile = (seg * tl.num_programs(1) + pid_m) * tl.num_programs(0) + pid_n
    ws_offs = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    _store_tile(acc, out_ptr, out_ptrs, row_ok[:, None] & col_ok[None, :], ws_ptr, counts_ptr,
                tile, ks, SPLIT_K, ws_offs, BLOCK_M * BLOCK_N, SPLIT_BOUND)


@triton.jit
def shrink_decode_kernel(
    x_ptr, a_ptr, ranks_ptr, token_slots_ptr, out_ptr, ws_ptr, counts_ptr,
    K, K_CHUNK, SPLIT_K, NR, R, N_SLICES, stride_xm, stride_as, stride_an, stride_om,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_BOUND: tl.constexpr,
):
    tok = tl.program_id(0)
    pid_n = tl.program_id(1)
    ks = tl.program_id(2)  # K chunk
    slot = tl.load(token_slots_ptr + tok)
    if slot < 0:
        return
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = _live_columns(ranks_ptr, slot, cols, NR, R, N_SLICES)
    if tl.max(col_ok.to(tl.int32), axis=0) == 0:
        return
    k_lo = ks * K_CHUNK
    k_hi = tl.minimum(K, k_lo + K_CHUNK)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tok.to(tl.int64) * stride_xm + k_lo + offs_k  # [BK]
    a_ptrs = (a_ptr + slot.to(tl.int64) * stride_as + cols[:, None] * stride_an
              + (k_lo + offs_k)[None, :])  # [BN, BK]
    h = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # Loads are not software-pipelined here (no dot): the config keeps this loop at ~1 trip
    # and gets its memory parallelism from many programs (split-K) instead.
    for k in range(k_lo, k_hi, BLOCK_K):
        k_ok = offs_k < k_hi - k
        xv = tl.load(x_ptrs, mask=k_ok, other=0.0).to(tl.float32)
        at = tl.load(a_ptrs, mask=col_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        h += tl.sum(at * xv[None, :], axis=1)
        x_ptrs += BLOCK_K
        a_ptrs += BLOCK_K
    out_ptrs = out_ptr + tok.to(tl.int64) * stride_om + cols
    tile = tok * tl.num_programs(1) + pid_n
    _store_tile(h, out_ptr, out_ptrs, col_ok, ws_ptr, counts_ptr, tile, ks, SPLIT_K,
                tl.arange(0, BLOCK_N), BLOCK_N, SPLIT_BOUND)


@triton.jit
def expand_segment_kernel(
    h_ptr, b_ptr, ranks_ptr, scalings_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr, y_ptr,
    cs_ptr, csh_ptr, cflags_ptr,
    R, N_SLICES, O0, O1, O2, O3, O4, stride_hm, stride_bs, stride_bn, stride_ym, stride_cs,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_COL_SCALES: tl.constexpr,
):
    pid_m = tl.program_id(1)
    seg = tl.program_id(2)
    sl, col0, hi = _slice_tile(tl.program_id(0), O0, O1, O2, O3, O4, BLOCK_N)
    slot = tl.load(seg_slots_ptr + seg)
    length = tl.load(seg_lens_ptr + seg)
    if (slot < 0) | (pid_m * BLOCK_M >= length):
        return
    rank = tl.load(ranks_ptr + slot * N_SLICES + sl)
    if rank == 0:
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
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_COL_SCALES:
        if tl.load(cflags_ptr + slot) != 0:  # DoRA slot: map the base output first
            g, sh = _column_scales(cs_ptr, csh_ptr, slot, cols, col_ok, stride_cs)
            y = y * g[None, :] + sh[None, :]
    y += acc * scale
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def expand_decode_kernel(
    h_ptr, b_ptr, ranks_ptr, scalings_ptr, token_slots_ptr, y_ptr, cs_ptr, csh_ptr, cflags_ptr,
    R, N_SLICES, O0, O1, O2, O3, O4, stride_hm, stride_bs, stride_bn, stride_ym, stride_cs,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, HAS_COL_SCALES: tl.constexpr,
):
    tok = tl.program_id(0)
    sl, col0, hi = _slice_tile(tl.program_id(1), O0, O1, O2, O3, O4, BLOCK_N)
    slot = tl.load(token_slots_ptr + tok)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot * N_SLICES + sl)
    if rank == 0:
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
    y = tl.load(y_ptrs, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_COL_SCALES:
        if tl.load(cflags_ptr + slot) != 0:  # DoRA slot: map the base output first
            g, sh = _column_scales(cs_ptr, csh_ptr, slot, cols, col_ok, stride_cs)
            y = y * g + sh
    y += tl.sum(acc, axis=1) * scale
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=col_ok)
