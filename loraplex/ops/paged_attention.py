"""Paged attention backends: one contract, two implementations.

``"torch"`` (``paged_attention_torch``): any device, the CPU path; its work is proportional
to the block table's width, so callers narrow the table to the batch's real contexts.
``"triton"`` (``paged_attention_triton``): CUDA, flash-decoding kernels reading only each
sequence's real blocks; capturable in CUDA graphs. ``"auto"`` picks Triton on CUDA when it is
installed and takes the dtype and head size, else torch.

The contract is ``paged_attention_ref.paged_decode_attention_ref`` (semantics as code). Every
backend takes ``(q, k_cache, v_cache, block_tables, context_lens, scale, out)``; cached tokens
are always addressed as ``block_tables`` + lengths, so an "extend" op (a prefill chunk's
queries over its cached prefix plus, causally, its own tokens) fits the same backends.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

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
