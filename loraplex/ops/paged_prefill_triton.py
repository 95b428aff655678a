"""Extend attention as a Triton kernel (GPU; the interpreter runs it on CPU in tests).

Same contract as ``paged_attention_ref.paged_prefill_attention_ref``; the kernel design is in
``paged_prefill_kernels`` and ``docs/kernels.md``. Work is proportional to each chunk's real
context: a program reads only the blocks between its queries' window edge and its last
query's position, whatever the table's width. The launch depends on shapes and the host
bounds only (no host sync, no allocation besides ``out`` when not given).
"""

from __future__ import annotations

import torch
import triton

from loraplex.ops import paged_prefill_kernels as K
from loraplex.ops.paged_attention_triton import _require, check_cache_operands

NO_WINDOW = 1 << 30  # "no sliding window": farther back than any context
TILE_BYTES = 16384  # one K (and one V) tile per loop trip: 64 tokens at d=128 in 16 bits


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    max_context_len: int,
    sliding_window: int | None = None,
    softcap: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q [T, H, d]`` -> ``out [T, H, d]`` (written and returned; allocated when None).
    ``block_tables [B, W]``, ``cu_seqlens_q [B + 1]`` and ``context_lens [B]`` int32/int64 on
    q's device; chunk lengths ``<= max_query_len`` and ``<= context_lens[b] <= W * block_size``
    (not checked: that would sync). ``max_context_len`` is not needed by the kernel."""
    tokens, heads, d = q.shape
    _, block_size, kv_heads, d_cache = k_cache.shape
    bsz = context_lens.shape[0]
    _require(cu_seqlens_q.shape == (bsz + 1,) and cu_seqlens_q.is_contiguous(),
             "cu_seqlens_q: [B + 1]")
    check_cache_operands(q, k_cache, v_cache, block_tables, context_lens,
                         ("cu_seqlens_q", cu_seqlens_q), rows="T")
    _require(sliding_window is None or sliding_window >= 1, "sliding_window: >= 1 or None")
    _require(softcap is None or softcap > 0, "softcap: > 0 or None")
    if out is None:
        out = torch.empty(tokens, heads, d, dtype=q.dtype, device=q.device)
    _require(out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1,
             "out: [T, H, d] in q's dtype, unit stride along d")
    if tokens == 0 or bsz == 0:
        return out
    group = heads // kv_heads
    group_pad = triton.next_power_of_2(group)
    rows, tile_n, warps = _config(d, q.element_size())
    tile_q = max(1, rows // group_pad)
    tiles_per_seq = triton.cdiv(max_query_len, tile_q)
    K.paged_prefill_kernel[(bsz * tiles_per_seq, kv_heads)](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale, float(softcap or 1.0), sliding_window or NO_WINDOW, tiles_per_seq,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, TILE_Q=tile_q, HEAD_DIM=d, BLOCK_SIZE=block_size,
        TILE_N=tile_n, SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=warps, num_stages=2,
    )
    return out


def _config(head_dim: int, itemsize: int) -> tuple[int, int, int]:
    """(query rows per program, key tokens per tile, warps), chosen so that no launch of
    ``paged_prefill_aot`` spills on sm_90. 16 bits: 64 rows (the MMA's M), 64 keys at
    d <= 128 and 32 at d=256, 8 warps from d=128 (4 held 230-242 registers at d=128). float32
    (ieee dots, no tensor cores): 32 rows and 8 warps (64 rows spilled up to 2 KiB)."""
    tile_n = max(16, min(64, TILE_BYTES // (head_dim * itemsize)))
    if itemsize == 4:
        return 32, tile_n, 8
    return 64, tile_n, 4 if head_dim <= 64 else 8
