"""Plain references for paged attention, decode and extend (a prefill chunk over its cached
prefix): one sequence at a time, its blocks gathered, an explicit softmax in float64. Obviously
correct and slow; tests compare the backends (``paged_attention_torch``, ``paged_prefill_torch``,
the Triton kernels) against them.
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
                p = softmax(scale * k[:, h // (H // KVH)] @ q[b, h])   # [n]
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
            out[b, h] = (scores.softmax(0) @ v[:, h // group]).to(q.dtype)
    return out


def paged_prefill_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Extend attention: each sequence's new tokens (a "chunk") attend over its cached prefix
    and, causally, over the chunk itself, all read through its block table.

    Shapes: ``q [T, H, d]`` holds the chunks of ``B`` sequences back to back, chunk ``b`` being
    ``q[cu_seqlens_q[b] : cu_seqlens_q[b + 1]]`` (length ``l_b >= 1``); ``k_cache``/``v_cache``
    ``[num_blocks, block_size, KVH, d]`` already hold the chunks' own keys/values;
    ``block_tables [B, W]``; ``context_lens [B]`` counts sequence ``b``'s cached tokens including
    its chunk (``l_b <= context_lens[b] <= W * block_size``). Returns ``[T, H, d]`` in q's dtype.
    Semantics::

        for b in range(B):
            n, l = context_lens[b], cu_seqlens_q[b + 1] - cu_seqlens_q[b]
            k, v = first n tokens behind block_tables[b]                 # [n, KVH, d]
            for j in range(l):                      # query j sits at position p = n - l + j
                p = n - l + j
                keys = [i for i in range(n) if i <= p and (window is None or i > p - window)]
                for h in range(H):
                    s = scale * k[keys, h // (H // KVH)] @ q[cu_seqlens_q[b] + j, h]
                    if softcap: s = softcap * tanh(s / softcap)
                    out[cu_seqlens_q[b] + j, h] = softmax(s) @ v[keys, h // (H // KVH)]

    A decode token is a chunk of length 1 (``paged_decode_attention_ref`` without window or
    softcap); a prompt with nothing cached is a chunk with ``l_b == context_lens[b]``.
    """
    heads, d = q.shape[1], q.shape[2]
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    out = torch.empty_like(q)
    cu = [int(x) for x in cu_seqlens_q]
    for b in range(len(cu) - 1):
        n, lo, hi = int(context_lens[b]), cu[b], cu[b + 1]
        blocks = block_tables[b, : -(-n // block_size)].long()
        k = k_cache[blocks].reshape(-1, kv_heads, d)[:n].double()  # [n, KVH, d]
        v = v_cache[blocks].reshape(-1, kv_heads, d)[:n].double()
        pos = torch.arange(n - (hi - lo), n)[:, None]  # [l, 1]: each query's position
        key = torch.arange(n)[None, :]  # [1, n]
        visible = key <= pos
        if sliding_window is not None:
            visible &= key > pos - sliding_window
        for h in range(heads):
            scores = scale * (q[lo:hi, h].double() @ k[:, h // group].T)  # [l, n]
            if softcap is not None:
                scores = softcap * torch.tanh(scores / softcap)
            probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
            out[lo:hi, h] = (probs @ v[:, h // group]).to(q.dtype)
    return out
