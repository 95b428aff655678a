"""Paged decode attention in plain torch (any device; the CPU backend).

Same contract as ``paged_attention_ref.paged_decode_attention_ref``. It gathers every block the
table lists, so its work is ``B x block_tables.shape[1] x block_size`` tokens per layer:
callers pass the table narrowed to the batch's longest real context
(``ForwardBatch.decode_block_tables``), never the static max_model_len-wide buffer. Tokens
past each sequence's length are cut by an additive mask over that width, which a step builds
once and shares across its layers (``decode_attention_bias``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def decode_attention_bias(context_lens: torch.Tensor, length: int, dtype: torch.dtype,
                          sliding_window: int | None = None) -> torch.Tensor:
    """``[B, 1, 1, length]`` additive mask: 0 over each sequence's ``context_lens[b]`` tokens,
    -inf past them (the gathered blocks' tails and unused table columns) and, with a
    ``sliding_window``, before the window (the query at ``n - 1`` sees ``(n - 1 - window,
    n - 1]``)."""
    pos = torch.arange(length, device=context_lens.device)[None, :]
    past = pos >= context_lens[:, None]
    if sliding_window is not None:
        past |= pos < context_lens[:, None] - sliding_window
    mask = torch.zeros(past.shape, dtype=dtype, device=context_lens.device)
    return mask.masked_fill_(past, float("-inf"))[:, None, None, :]


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    attn_bias: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``q [B, H, d]`` -> ``out [B, H, d]`` (written and returned; allocated when None).
    ``attn_bias``: ``decode_attention_bias(context_lens, W * block_size, q.dtype,
    sliding_window)`` for this table width ``W``, built here when None."""
    bsz, heads, d = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    length = block_tables.shape[1] * block_size
    if attn_bias is None:
        attn_bias = decode_attention_bias(context_lens, length, q.dtype, sliding_window)
    # [B * W, block_size, KVH, d] -> [B, KVH, L, d]; index_select gathers about twice as fast
    # as advanced indexing on CPU
    flat = block_tables.reshape(-1)
    keys = k_cache.index_select(0, flat).view(bsz, length, kv_heads, d).transpose(1, 2)
    values = v_cache.index_select(0, flat).view(bsz, length, kv_heads, d).transpose(1, 2)
    # grouped-query attention without repeating k/v: the group's query heads are the "query
    # length" axis of one kv head
    qs = q.view(bsz, kv_heads, heads // kv_heads, d)
    if softcap is None:
        o = F.scaled_dot_product_attention(qs, keys, values, attn_mask=attn_bias, scale=scale)
    else:  # SDPA has no hook between the scores and the mask: spell it out (Gemma 2)
        scores = (qs @ keys.transpose(-1, -2)).mul_(scale)  # [B, KVH, G, L]
        scores = scores.div_(softcap).tanh_().mul_(softcap).add_(attn_bias)
        o = scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ values
    o = o.reshape(bsz, heads, d)  # [B, KVH, G, d] is [B, H, d] in head order
    if out is None:
        return o
    return out.copy_(o)
