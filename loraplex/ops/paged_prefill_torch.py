"""Extend attention (prefill chunks over their cached prefix) in plain torch: the CPU backend.

Same contract as ``paged_attention_ref.paged_prefill_attention_ref``. The batch becomes one
padded attention call: chunks are padded to ``max_query_len`` rows, contexts are gathered
through the block table narrowed to the blocks ``max_context_len`` tokens span (never the
table's full, possibly max_model_len, width), and a boolean mask ``[B, 1, rows, L]`` applies
each chunk's causal offset, its sequence's length and the sliding window. Work is
``B x max_query_len x max_context_len``; no per-token (or per-sequence) Python loop, no host
sync (the row layout is derived on the device).

Grouped-query attention without repeating k/v: a kv head's ``G`` query heads are folded into
the query-row axis (``[B, KVH, max_query_len * G, d]``), as the decode path does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    """``q [T, H, d]`` -> ``out [T, H, d]`` (written and returned; allocated when None)."""
    tokens, heads, d = q.shape
    bsz = context_lens.shape[0]
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    width = min(block_tables.shape[1], -(-max_context_len // block_size))
    length = width * block_size
    flat = block_tables[:, :width].reshape(-1)
    # [B * width, block_size, KVH, d] -> [B, KVH, L, d]
    keys = k_cache.index_select(0, flat).view(bsz, length, kv_heads, d).transpose(1, 2)
    values = v_cache.index_select(0, flat).view(bsz, length, kv_heads, d).transpose(1, 2)

    rows = max_query_len
    padded = tokens != bsz * rows  # every chunk is <= rows long, so == means all are == rows
    if padded:
        index = _padded_rows(cu_seqlens_q, tokens, rows)  # [T]
        qp = q.new_zeros(bsz * rows, heads, d).index_copy_(0, index, q)
    else:
        qp = q
    # [B, rows, KVH, G, d] -> [B, KVH, rows * G, d]: query row r * G + g is chunk row r, head g
    qs = qp.reshape(bsz, rows, kv_heads, group, d).permute(0, 2, 1, 3, 4)
    qs = qs.reshape(bsz, kv_heads, rows * group, d)
    mask = prefill_attention_mask(cu_seqlens_q, context_lens, rows, length, sliding_window)
    mask = mask[:, :, :, None, :].expand(bsz, 1, rows, group, length)
    mask = mask.reshape(bsz, 1, rows * group, length)
    if softcap is None:
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=mask, scale=scale)
    else:  # SDPA has no softcap: explicit scores, softmax in float32
        scores = torch.matmul(qs, keys.transpose(-1, -2)).float() * scale
        scores = torch.tanh(scores / softcap) * softcap
        probs = scores.masked_fill_(~mask, float("-inf")).softmax(-1)
        o = torch.matmul(probs.to(values.dtype), values)
    # [B, KVH, rows * G, d] -> [B, rows, KVH, G, d] = [B * rows, H, d] in head order
    o = o.view(bsz, kv_heads, rows, group, d).permute(0, 2, 1, 3, 4).reshape(bsz * rows, heads, d)
    if padded:
        o = o.index_select(0, index)
    if out is None:
        return o
    return out.copy_(o)


def prefill_attention_mask(cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor, rows: int,
                           length: int, sliding_window: int | None = None) -> torch.Tensor:
    """``[B, 1, rows, length]`` boolean, True where chunk row ``j`` of sequence ``b`` sees key
    ``i``: ``i <= p`` and, with a window, ``i > p - window``, for the query position
    ``p = context_lens[b] - l_b + j``. Padding rows (``j >= l_b``) take the last real
    position, so no row is empty (an all-False row would make the softmax NaN)."""
    lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(context_lens.device)  # [B]
    j = torch.arange(rows, device=context_lens.device)
    pos = (context_lens - lens)[:, None] + j[None, :]  # [B, rows]
    pos = torch.minimum(pos, (context_lens - 1)[:, None])
    key = torch.arange(length, device=context_lens.device)[None, None, :]
    visible = key <= pos[:, :, None]
    if sliding_window is not None:
        visible &= key > (pos - sliding_window)[:, :, None]
    return visible[:, None]


def _padded_rows(cu_seqlens_q: torch.Tensor, tokens: int, rows: int) -> torch.Tensor:
    """``[T]`` int64: token ``t`` of chunk ``b`` (``cu[b] <= t < cu[b + 1]``) goes to padded row
    ``b * rows + t - cu[b]``."""
    t = torch.arange(tokens, device=cu_seqlens_q.device)
    seq = torch.searchsorted(cu_seqlens_q[1:], t, right=True)  # chunk of each token
    return seq * rows + t - cu_seqlens_q[seq]
