"""Triton kernel behind ``paged_prefill_triton`` (launch it through that wrapper only).

Extend attention over the paged KV cache: a prefill chunk's queries attend to the sequence's
cached prefix and, causally, to the chunk itself, all read through the block table (the
chunk's keys/values are already in the cache). Grid ``(B * tiles_per_seq, KVH)``: a program
owns one tile of ``TILE_Q`` consecutive query tokens of one chunk and one kv head, and serves
all ``GROUP = H // KVH`` query heads of that kv head at once. Its ``[TILE_Q * GROUP_PAD, d]``
query tile has row ``r`` = token ``r // GROUP_PAD``, head ``r % GROUP_PAD`` (rows past the
chunk or the group are masked), so every K/V byte is read once per kv head and tile, never
once per query head, and the rows fill the MMA's M dimension even at one token per group.
``tiles_per_seq = cdiv(max_query_len, TILE_Q)`` is a host bound; programs past their chunk's
end return at once.

A program streams its sequence's keys in ``TILE_N``-token tiles from the window's lower edge
(``min_pos - window + 1``, else 0) to its last query's position: keys past the tile's last
query are never read (causal skipping). Each key tile reads ``TILE_N`` block-table entries
(one per token: any block size works) then the ``[TILE_N, d]`` K and V tiles (contiguous rows,
as in ``paged_attention_kernels``). Scores ``tl.dot`` in float32; ``softcap * tanh(s / softcap)``
when ``SOFTCAP``; the causal / window mask per (row, key); online softmax in base 2. A row
that has seen no key yet keeps ``m = -inf`` and contributes nothing (``m_safe``), so masked
rows never produce NaN; every real row sees at least its own position.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_prefill_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, cu_ptr, lens_ptr, out_ptr,
    sm_scale, softcap, window, tiles_per_seq,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_tb, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, TILE_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    b = (pid // tiles_per_seq).to(tl.int64)
    q0 = (pid % tiles_per_seq) * TILE_Q  # first chunk row of this tile
    lo = tl.load(cu_ptr + b).to(tl.int32)
    chunk = tl.load(cu_ptr + b + 1).to(tl.int32) - lo
    if q0 >= chunk:
        return
    ctx = tl.load(lens_ptr + b).to(tl.int32)
    rows = tl.arange(0, TILE_Q * GROUP_PAD)
    j = q0 + rows // GROUP_PAD  # chunk row of each query row
    g = rows % GROUP_PAD
    row_ok = (j < chunk) & (g < GROUP)
    pos = ctx - chunk + j  # each query's position in its sequence
    heads = kvh * GROUP + g
    cols = tl.arange(0, HEAD_DIM)
    q_offs = (lo + j).to(tl.int64)[:, None] * stride_qt + heads[:, None] * stride_qh
    q = tl.load(q_ptr + q_offs + cols[None, :], mask=row_ok[:, None], other=0.0)

    last = tl.minimum(ctx - chunk + q0 + TILE_Q, ctx)  # one past the tile's last position
    first = tl.maximum(ctx - chunk + q0 - window + 1, 0)  # the first row's window edge
    m = tl.full([TILE_Q * GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([TILE_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([TILE_Q * GROUP_PAD, HEAD_DIM], tl.float32)
    table = tables_ptr + b * stride_tb
    head_off = kvh * stride_kh + cols[None, :]
    for t0 in range(first, last, TILE_N):
        tok = t0 + tl.arange(0, TILE_N)
        ok = tok < last
        blk = tl.load(table + tok // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        offs = blk[:, None] * stride_kb + (tok % BLOCK_SIZE)[:, None] * stride_kt + head_off
        k = tl.load(k_ptr + offs, mask=ok[:, None], other=0.0)  # [TILE_N, d]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale  # [rows, TILE_N]
        if SOFTCAP:  # tanh(x) = 1 - 2 / (e^2x + 1): exact limits +-1 when e^2x over/underflows
            s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
        s = s * LOG2E
        seen = (tok[None, :] <= pos[:, None]) & (tok[None, :] > pos[:, None] - window)
        s = tl.where(seen & ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs, mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    o = acc / tl.where(row_ok, denom, 1.0)[:, None]
    o_offs = (lo + j).to(tl.int64)[:, None] * stride_ot + heads[:, None] * stride_oh
    tl.store(out_ptr + o_offs + cols[None, :], o.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])
