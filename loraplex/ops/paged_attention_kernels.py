"""Triton kernels behind ``paged_attention_triton`` (launch them through its wrapper only).

Flash-decoding over the paged KV cache. ``paged_decode_split_kernel`` has grid
``(B, KVH, num_splits)``: a program owns one sequence, one kv head and one contiguous share of
that sequence's tokens, and serves all ``GROUP = H // KVH`` query heads of that kv head at
once (the query group is a ``[GROUP_PAD, d]`` tile, so every K/V byte is read once per kv
head, not once per query head). Its share is derived on the device from the sequence's
length: ``ceil(len / TILE_N)`` tiles split into ``num_splits`` runs of whole tiles, so short
sequences leave trailing programs with nothing to do. Each program streams ``TILE_N``-token
tiles: ``TILE_N`` block-table entries (one per token, neighbours hit the same cache line),
then one ``[TILE_N, d]`` K tile and one V tile. Within a block the tokens of one kv head are
``KVH * d`` elements apart and each row of ``d`` elements is contiguous, so a tile is
``TILE_N`` contiguous rows: coalesced, several blocks per tile, and any block size works.

Scores and the weighted sum use ``tl.dot`` on the query group padded to 16 rows (the minimum
MMA height). Decode is bandwidth-bound, so the padded rows' tensor-core work is free, and the
accumulator stays in the MMA layout; a broadcast-multiply-sum would hold
``GROUP x TILE_N x d`` products in registers (64 K for GROUP 8, d 128) and fall apart beyond
small groups. Softmax runs online in float32 in base 2 (``qk_scale`` = scale * log2 e).

``HAS_WINDOW`` (sliding-window attention): a sequence's tokens start at ``max(0, len -
window)`` instead of 0, so the blocks before the window are never read and the splits share
only the window. ``SOFTCAP`` (Gemma 2): scores become ``softcap * tanh(scores / softcap)``;
in base 2 that is ``c * tanh(s / c)`` with ``c = softcap * log2 e`` (``softcap_log2``), as
``tanh`` commutes with the change of base only through its argument's scale.

``DIRECT`` (one split): the program normalises and stores the output itself. Otherwise it
stores float32 partials ``(m, denom, acc)`` for each real query row (max score, sum of
exponentials, unnormalised output) into scratch; an empty share stores the neutral partial
(m = -inf, denom = 0, acc = 0). ``paged_decode_reduce_kernel`` (grid ``(B, H)``) then combines a
head's splits with weights ``2^(m_s - max m)``, which are 0 for the neutral partials.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def paged_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, m_ptr, denom_ptr, acc_ptr,
    qk_scale, softcap_log2, window, num_heads, num_splits,
    stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_tb, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, DIRECT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b).to(tl.int32)
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(seq_len - window, 0)
    share = tl.cdiv(tl.cdiv(seq_len - first, TILE_N), num_splits) * TILE_N
    start = first + split * share
    end = tl.minimum(start + share, seq_len)  # < start for an empty share: no iterations

    rows = tl.arange(0, GROUP_PAD)
    row_ok = rows < GROUP
    heads = kvh * GROUP + rows
    cols = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + cols[None, :],
                mask=row_ok[:, None], other=0.0)  # [GROUP_PAD, d]
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = tables_ptr + b * stride_tb
    head_off = kvh * stride_kh + cols[None, :]
    for t0 in range(start, end, TILE_N):
        tok = t0 + tl.arange(0, TILE_N)
        ok = tok < end
        blk = tl.load(table + tok // BLOCK_SIZE, mask=ok, other=0).to(tl.int64)
        offs = blk[:, None] * stride_kb + (tok % BLOCK_SIZE)[:, None] * stride_kt + head_off
        k = tl.load(k_ptr + offs, mask=ok[:, None], other=0.0)  # [TILE_N, d]
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [G_PAD, TILE_N]
        if SOFTCAP:  # tanh(y) = 2 sigmoid(2y) - 1 (Triton has no tanh the interpreter runs)
            s = softcap_log2 * (2.0 / (1.0 + tl.exp(-2.0 * s / softcap_log2)) - 1.0)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile has a real token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + offs, mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    if DIRECT:
        o = acc / denom[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + cols[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        part = (b * num_heads + heads) * num_splits + split  # partial [b, head, split]
        tl.store(m_ptr + part, m, mask=row_ok)
        tl.store(denom_ptr + part, denom, mask=row_ok)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + cols[None, :], acc, mask=row_ok[:, None])


@triton.jit
def paged_decode_reduce_kernel(
    m_ptr, denom_ptr, acc_ptr, out_ptr, num_heads, num_splits, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, SPLIT_PAD: tl.constexpr, SPLIT_CHUNK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    first = (b * num_heads + h) * num_splits  # partial [b, h, 0]
    splits = tl.arange(0, SPLIT_PAD)
    m = tl.load(m_ptr + first + splits, mask=splits < num_splits, other=float("-inf"))
    m_max = tl.max(m, 0)  # split 0 is never empty, so this is finite
    cols = tl.arange(0, HEAD_DIM)
    total = tl.zeros([HEAD_DIM], tl.float32)
    denom = tl.zeros([SPLIT_CHUNK], tl.float32)
    # acc rows in chunks: a [SPLIT_PAD, d] tile would not fit in registers at 128 x 256
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        part = s0 + tl.arange(0, SPLIT_CHUNK)
        ok = part < num_splits
        w = tl.exp2(tl.load(m_ptr + first + part, mask=ok, other=float("-inf")) - m_max)
        denom += w * tl.load(denom_ptr + first + part, mask=ok, other=0.0)
        acc = tl.load(acc_ptr + (first + part)[:, None] * HEAD_DIM + cols[None, :],
                      mask=ok[:, None], other=0.0)
        total += tl.sum(acc * w[:, None], 0)
    o = total / tl.sum(denom, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + cols, o.to(out_ptr.dtype.element_ty))
