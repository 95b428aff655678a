"""Attention over the paged KV cache, in plain torch (runs on CPU and CUDA).

Prefill: each sequence's new keys/values are written to the cache and attention runs causally
over that sequence's own tokens (no cached prefix). Decode: the new token's key/value is written,
then each sequence attends over its cached context, gathered through its block table.
Grouped-query attention folds the query heads of one kv head into the "query length" axis, so
no key/value is repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.forward_context import get_forward_batch


class Attention(nn.Module):
    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, heads, d]; k, v [T, kv_heads, d] -> [T, heads * d]."""
        batch = get_forward_batch()
        if batch.slot_mapping is not None:
            k_cache, v_cache = batch.kv_caches[self.layer_idx]
            # cache: [num_blocks, block_size, kv_heads, d] viewed as [slots, kv_heads, d]
            k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, k)
            v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, v)
        if batch.is_prefill:
            out = self._prefill(q, k, v, batch.cu_seqlens)
        else:
            out = self._decode(q, batch)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _prefill(self, q, k, v, cu_seqlens: list[int]) -> torch.Tensor:
        out = torch.empty_like(q)
        for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
            n = end - start
            # queries grouped by their kv head: [kv_heads, group, n, d], causal per sequence
            qs = q[start:end].view(n, self.num_kv_heads, self.group, self.head_dim)
            qs = qs.permute(1, 2, 0, 3)  # [kvh, g, n, d]
            # keys/values broadcast over the group (stride 0, no copy): the fused
            # (flash) kernel takes this, while a size-1 group dim falls back to the math path
            shape = (self.num_kv_heads, self.group, n, self.head_dim)
            ks = k[start:end].transpose(0, 1).unsqueeze(1).expand(shape)
            vs = v[start:end].transpose(0, 1).unsqueeze(1).expand(shape)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale)
            out[start:end] = o.permute(2, 0, 1, 3).reshape(n, self.num_heads, self.head_dim)
        return out

    def _decode(self, q: torch.Tensor, batch) -> torch.Tensor:
        k_cache, v_cache = batch.kv_caches[self.layer_idx]
        bsz = q.shape[0]
        tables = batch.block_tables  # [B, max_blocks]
        block_size = k_cache.shape[1]
        # [B * max_blocks, block_size, kvh, d] -> [B, kvh, L, d]; index_select gathers about
        # twice as fast as advanced indexing on CPU
        length = tables.shape[1] * block_size
        flat = tables.reshape(-1)
        keys = k_cache.index_select(0, flat).view(bsz, length, self.num_kv_heads, self.head_dim)
        values = v_cache.index_select(0, flat).view(bsz, length, self.num_kv_heads, self.head_dim)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        pos = torch.arange(length, device=q.device)
        mask = pos[None, :] < batch.context_lens[:, None]  # [B, L]
        qs = q.view(bsz, self.num_kv_heads, self.group, self.head_dim)
        o = F.scaled_dot_product_attention(
            qs, keys, values, attn_mask=mask[:, None, None, :], scale=self.scale
        )
        return o  # [B, kvh, g, d] == [B, heads, d] in head order
