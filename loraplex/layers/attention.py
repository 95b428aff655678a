"""Attention over the paged KV cache.

Prefill (plain torch, CPU and CUDA): each sequence's new keys/values are written to the cache
and attention runs causally over that sequence's own tokens (no cached prefix); sequences of
similar length share one call (``prefill_groups.py``). In a mixed step (chunked prefill or a
prefix-cache hit) the rows with a cached prefix, decode tokens included, attend over the cache
through their block tables instead (``paged_prefill_attention``), while the rows with none keep
the grouped causal path. Decode: the new token's key/value is
written, then each sequence attends over its cached context through its block table
(``ops/paged_attention.py``: a Triton flash-decoding kernel on CUDA, a torch gather over the
batch's real width elsewhere). Grouped-query attention never repeats keys/values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.layers.forward_context import get_forward_batch
from loraplex.layers.prefill_groups import PrefillGroup
from loraplex.ops.paged_attention import (
    paged_decode_attention,
    paged_prefill_attention,
    resolve_attention_backend,
)

# query rows per soft-capped prefill score tile (its scores are spelled out, not fused)
_SCORE_ROWS = 512

# torch >= 2.5: scaled_dot_product_attention reads grouped kv heads itself (enable_gqa)
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


def _gqa_in_kernel(q: torch.Tensor) -> bool:
    """Whether a fused attention kernel takes enable_gqa for ``q``: the CPU flash kernel
    does (tested here), CUDA's flash kernel does for float16/bfloat16. CUDA float32 has only
    the memory-efficient kernel, which (per PyTorch's kernel selection rules; not run on a GPU
    yet) does not, so there repeated k/v heads keep a fused kernel."""
    return _SDPA_GQA and (q.device.type == "cpu" or q.dtype in (torch.float16, torch.bfloat16))


class Attention(nn.Module):
    """``scale``: on the scores (default ``head_dim ** -0.5``); ``sliding_window``: the query
    at position p sees keys in (p - window, p]; ``softcap``: scores -> softcap *
    tanh(scores / softcap) before the mask (Gemma 2)."""

    def __init__(self, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
                 scale: float | None = None, sliding_window: int | None = None,
                 softcap: float | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window, self.softcap = sliding_window, softcap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, heads, d]; k, v [T, kv_heads, d] -> [T, heads * d]."""
        batch = get_forward_batch()
        if batch.slot_mapping is not None:
            k_cache, v_cache = batch.kv_caches[self.layer_idx]
            # cache: [num_blocks, block_size, kv_heads, d] viewed as [slots, kv_heads, d]
            k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, k)
            v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(0, batch.slot_mapping, v)
        if batch.is_prefill and batch.extend is not None:
            out = self._mixed(q, k, v, batch)
        elif batch.is_prefill:
            out = self._prefill(q, k, v, batch.prefill_groups)
        else:
            out = self._decode(q, batch)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _mixed(self, q, k, v, batch) -> torch.Tensor:
        """A mixed step: extend rows over the cache, the other rows causal on their own."""
        ext = batch.extend
        k_cache, v_cache = batch.kv_caches[self.layer_idx]
        backend = resolve_attention_backend(batch.attn_backend, q.device, q.dtype, self.head_dim)
        q_ext = q if ext.tokens is None else q.index_select(0, ext.tokens)
        o = paged_prefill_attention(
            q_ext, k_cache, v_cache, ext.block_tables, ext.cu_seqlens_q, ext.context_lens,
            self.scale, max_query_len=ext.max_query_len, max_context_len=ext.max_context_len,
            sliding_window=self.sliding_window, softcap=self.softcap, backend=backend,
            cu_seqlens_q_host=ext.cu_seqlens_q_host, context_lens_host=ext.context_lens_host,
            plan=ext.torch_plan)
        if ext.tokens is None:
            return o
        out = self._prefill(q, k, v, batch.prefill_groups or [], partial=True)
        return out.index_copy_(0, ext.tokens, o)

    def _prefill(self, q, k, v, groups: list[PrefillGroup], partial: bool = False
                 ) -> torch.Tensor:
        """q [T, heads, d]; k, v [T, kv_heads, d] -> [T, heads, d], causal per sequence, one
        attention call per group of similar-length sequences (see prefill_groups.py).
        ``partial``: the groups cover only some rows; the other rows are left unwritten."""
        heads, d = self.num_heads, self.head_dim
        if not partial and len(groups) == 1 and groups[0].gather is None:  # e.g. one prompt
            return self._causal(q, k, v, groups[0]).reshape(q.shape[0], heads, d)
        out = q.new_empty(q.shape[0], heads, d)
        for g in groups:
            o = self._causal(q, k, v, g)  # [size, length, heads, d]
            if g.gather is None:
                out[g.start : g.start + g.covers].view_as(o).copy_(o)
            else:
                out.index_copy_(0, g.dest, o.reshape(-1, heads, d).index_select(0, g.rows))
        return out

    def _causal(self, q, k, v, g: PrefillGroup) -> torch.Tensor:
        """One group's causal attention -> [size, length, heads, d] (a transposed view)."""
        def batched(x: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [size, h, length, d]
            if g.gather is None:
                x = x[g.start : g.start + g.covers]
            else:
                x = x.index_select(0, g.gather)
            return x.view(g.size, g.length, x.shape[1], self.head_dim).transpose(1, 2)

        qs, ks, vs = batched(q), batched(k), batched(v)
        if self.sliding_window is not None or self.softcap is not None:
            return self._masked(qs, ks, vs).transpose(1, 2)
        if _gqa_in_kernel(qs):  # query head h reads kv head h // group, without copying k/v
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale,
                                               enable_gqa=True)
        else:
            ks, vs = (x.repeat_interleave(self.group, dim=1) for x in (ks, vs))
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale)
        return o.transpose(1, 2)

    def _masked(self, qs, ks, vs) -> torch.Tensor:
        """Causal attention with the window and/or softcap, [size, h, length, d] each: an
        explicit mask (sequences in a group all start at position 0, so one mask serves the
        group), and with a softcap the scores spelled out (SDPA has no hook for it)."""
        length = qs.shape[2]
        pos = torch.arange(length, device=qs.device)
        allowed = pos[None, :] <= pos[:, None]  # [query, key]
        if self.sliding_window is not None:
            allowed &= pos[None, :] > pos[:, None] - self.sliding_window
        ks, vs = (x.repeat_interleave(self.group, dim=1) for x in (ks, vs))
        if self.softcap is None:
            return F.scaled_dot_product_attention(qs, ks, vs, attn_mask=allowed,
                                                  scale=self.scale)
        # query rows in chunks: the scores are [size, h, rows, length], not length squared
        out = torch.empty_like(qs)
        for r0 in range(0, length, _SCORE_ROWS):
            rows = slice(r0, r0 + _SCORE_ROWS)
            scores = (qs[:, :, rows] @ ks.transpose(-1, -2)).mul_(self.scale)
            scores = scores.div_(self.softcap).tanh_().mul_(self.softcap)
            scores = scores.masked_fill_(~allowed[rows], float("-inf"))
            out[:, :, rows] = scores.softmax(-1, dtype=torch.float32).to(qs.dtype) @ vs
        return out

    def _decode(self, q: torch.Tensor, batch) -> torch.Tensor:
        """q [B, heads, d] -> [B, heads, d] over each sequence's cached context."""
        k_cache, v_cache = batch.kv_caches[self.layer_idx]
        block_size = k_cache.shape[1]
        backend = resolve_attention_backend(batch.attn_backend, q.device, q.dtype, self.head_dim)
        # only the columns the batch's longest context needs: the torch backend gathers every
        # column it is given (the Triton kernel reads only real blocks whatever the width)
        tables = batch.decode_block_tables(block_size)
        bias = None
        if backend == "torch" and self.sliding_window is None:  # else the op masks per layer
            bias = batch.decode_mask(tables.shape[1] * block_size, q.dtype)
        return paged_decode_attention(q, k_cache, v_cache, tables, batch.context_lens,
                                      self.scale, backend=backend, attn_bias=bias,
                                      sliding_window=self.sliding_window, softcap=self.softcap)
