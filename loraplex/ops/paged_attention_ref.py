"""Plain reference for paged decode attention: one sequence at a time, its blocks gathered,
an explicit softmax in float64. Obviously correct and slow; tests compare the backends
(``paged_attention_torch``, ``paged_attention_triton``) against it.
"""

from __future__ import annotations

import torch


def paged_decode_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Each decode query attends over its sequence's cached tokens, read through its block table.

    Shapes: ``q [B, H, d]`` (one query token per sequence), ``k_cache``/``v_cache``
    ``[num_blocks, block_size, KVH, d]`` (one layer), ``block_tables [B, W]`` integer block ids,
    ``context_lens [B]`` integers with ``1 <= context_lens[b] <= W * block_size`` (they count the
    new token, whose key/value is already in the cache). Query head ``h`` reads kv head
    ``h // (H // KVH)`` (grouped-query attention). Returns ``[B, H, d]`` in q's dtype. Semantics::

        for b in range(B):
            n = context_lens[b]
            blocks = block_tables[b, : ceil(n / block_size)]
            k = k_cache[blocks].reshape(-1, KVH, d)[:n]          # [n, KVH, d], token order
            v = v_cache[blocks].reshape(-1, KVH, d)[:n]
            for h in range(H):
                s = scale * k[:, h // (H // KVH)] @ q[b, h]            # [n]
                if softcap is not None:
                    s = softcap * tanh(s / softcap)                      # Gemma 2
                if sliding_window is not None:                           # the query sits at
                    s[: n - sliding_window] = -inf                       # n - 1: keys in
                p = softmax(s)                                           # (n-1-window, n-1]
                out[b, h] = p @ v[:, h // (H // KVH)]

    Table entries past ``ceil(n / block_size)`` are never read (they may hold anything).
    """
    bsz, heads, d = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    for b in range(bsz):
        n = int(context_lens[b])
        blocks = block_tables[b, : -(-n // block_size)].long()
        k = k_cache[blocks].reshape(-1, kv_heads, d)[:n].double()  # [n, KVH, d]
        v = v_cache[blocks].reshape(-1, kv_heads, d)[:n].double()
        for h in range(heads):
            scores = scale * (k[:, h // group] @ q[b, h].double())  # [n]
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            if sliding_window is not None:
                scores[: max(0, n - sliding_window)] = float("-inf")
            out[b, h] = (scores.softmax(0) @ v[:, h // group]).to(q.dtype)
    return out
