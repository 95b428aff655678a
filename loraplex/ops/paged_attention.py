"""Paged attention backends: decode and extend, one contract each, two implementations.

``"torch"`` (``paged_attention_torch``): any device, the CPU path; its work is proportional
to the block table's width, so callers narrow the table to the batch's real contexts.
``"triton"`` (``paged_attention_triton``): CUDA, flash-decoding kernels reading only each
sequence's real blocks; capturable in CUDA graphs. ``"auto"`` picks Triton on CUDA when it is
installed and takes the dtype and head size, else torch.

The contracts are ``paged_attention_ref.paged_decode_attention_ref`` (one query token per
sequence) and ``paged_attention_ref.paged_prefill_attention_ref`` ("extend": a prefill chunk's
queries over the sequence's cached prefix plus, causally, the chunk's own tokens), semantics
as code. Cached tokens are always addressed as ``block_tables`` + lengths. The extend backends
are ``paged_prefill_torch`` (work proportional to the batch's real contexts) and
``paged_prefill_triton``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loraplex.ops.paged_prefill_torch import ExtendPlan

BACKENDS = ("torch", "triton")


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_attention_backend(backend: str, device: torch.device, dtype: torch.dtype,
                              head_dim: int) -> str:
    """``backend`` ("torch" | "triton" | "auto") -> the concrete backend for these tensors."""
    if backend == "auto":
        if device.type != "cuda" or not _has_triton():
            return "torch"
        from loraplex.ops import paged_attention_triton

        return "triton" if paged_attention_triton.supports(dtype, head_dim) else "torch"
    if backend == "triton":
        if not _has_triton():
            raise ValueError("attention backend 'triton' needs the 'triton' package")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"attention backend 'triton' needs a CUDA device, got {device}")
        return backend
    if backend != "torch":
        raise ValueError(f"attention backend {backend!r} must be one of {(*BACKENDS, 'auto')}")
    return backend


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    attn_bias: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Decode attention over the paged KV cache (one query token per sequence):
    ``q [B, H, d]`` -> ``[B, H, d]``, with the semantics of
    ``paged_attention_ref.paged_decode_attention_ref``::

        for b, h: out[b, h] = softmax(scale * K_b[:, h // G] @ q[b, h]) @ V_b[:, h // G]
        # K_b, V_b: the first context_lens[b] tokens behind block_tables[b]; G = H // KVH
        # softcap: scores -> softcap * tanh(scores / softcap) before the softmax (Gemma 2)
        # sliding_window: only the last sliding_window of those tokens (Mistral, Gemma)

    ``attn_bias``: torch backend only, its additive mask for this table width
    (``paged_attention_torch.decode_attention_bias``, with the same ``sliding_window``), so a
    step's layers share one.
    """
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window={sliding_window} must be >= 1")
    name = resolve_attention_backend(backend, q.device, q.dtype, q.shape[-1])
    if name == "triton":
        from loraplex.ops import paged_attention_triton

        return paged_attention_triton.paged_decode_attention(
            q, k_cache, v_cache, block_tables, context_lens, scale, out,
            sliding_window=sliding_window, softcap=softcap)
    from loraplex.ops import paged_attention_torch

    return paged_attention_torch.paged_decode_attention(
        q, k_cache, v_cache, block_tables, context_lens, scale, out, attn_bias,
        sliding_window=sliding_window, softcap=softcap)


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
    backend: str = "auto",
    cu_seqlens_q_host: list[int] | None = None,
    context_lens_host: list[int] | None = None,
    out: torch.Tensor | None = None,
    plan: ExtendPlan | None = None,
) -> torch.Tensor:
    """Extend attention over the paged KV cache: ``q [T, H, d]`` -> ``[T, H, d]``, with the
    semantics of ``paged_attention_ref.paged_prefill_attention_ref``::

        for b, j < l_b = cu_seqlens_q[b + 1] - cu_seqlens_q[b], h:   # p = context_lens[b] - l_b + j
            keys = [i <= p, and i > p - sliding_window if given]     # of sequence b's cache
            s = scale * K_b[keys, h // G] @ q[cu_seqlens_q[b] + j, h]
            s = softcap * tanh(s / softcap) if softcap else s
            out[cu_seqlens_q[b] + j, h] = softmax(s) @ V_b[keys, h // G]

    The chunks' own keys/values are already in the cache (written through the slot mapping
    before the call). ``block_tables [B, W]`` (W may be wider than needed), ``cu_seqlens_q
    [B + 1]`` and ``context_lens [B]`` int64 on q's device; ``max_query_len >= max l_b`` and
    ``max_context_len >= max context_lens`` are host bounds, so no backend syncs. A decode
    token is a chunk of length 1. ``cu_seqlens_q_host``: the same offsets on the host, when the
    caller has them: they are checked against ``q`` and the bounds (ValueError on a mismatch),
    and the torch backend groups chunks of similar length with them (a decode is not padded to
    a long chunk's length). ``context_lens_host``: ``context_lens`` on the host, when the
    caller has them: the torch backend then gathers each group of chunks only up to that
    group's longest context (a decode in a step with a long chunk reads its own context, not
    the chunk's). ``out``: written and returned when given. ``plan``: the torch backend's
    ``paged_prefill_torch.ExtendPlan`` for this step's metadata, shared across layers.
    """
    if cu_seqlens_q_host is not None:
        _check_chunks(cu_seqlens_q_host, q.shape[0], context_lens.shape[0], max_query_len)
    kw = dict(max_query_len=max_query_len, max_context_len=max_context_len,
              sliding_window=sliding_window, softcap=softcap, out=out)
    name = resolve_attention_backend(backend, q.device, q.dtype, q.shape[-1])
    if name == "triton":
        from loraplex.ops import paged_prefill_triton

        return paged_prefill_triton.paged_prefill_attention(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale, **kw)
    from loraplex.ops import paged_prefill_torch

    return paged_prefill_torch.paged_prefill_attention(
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, scale,
        cu_seqlens_q_host=cu_seqlens_q_host, context_lens_host=context_lens_host, plan=plan,
        **kw)


def _check_chunks(cu: list[int], tokens: int, bsz: int, max_query_len: int) -> None:
    lens = [hi - lo for lo, hi in zip(cu[:-1], cu[1:], strict=True)]
    if len(cu) != bsz + 1 or cu[0] != 0 or cu[-1] != tokens:
        raise ValueError(f"cu_seqlens_q_host {cu[:8]}...: must be {bsz + 1} offsets from 0 to "
                         f"q's {tokens} tokens")
    if lens and (min(lens) < 1 or max(lens) > max_query_len):
        raise ValueError(f"cu_seqlens_q_host: chunk lengths must be in 1..max_query_len "
                         f"({max_query_len}), got {min(lens)}..{max(lens)}")
