"""Sliding-window and soft-capped decode attention (Mistral, Gemma 2/3): the Triton kernel
(under the interpreter without CUDA) and the torch path against the float64 reference, and
the reference itself against a direct per-query computation."""

from __future__ import annotations

import math

import pytest
import torch
from test_paged_attention import BLOCK, DEVICE, TOL, make_case

from loraplex.ops import paged_attention_torch, paged_attention_triton
from loraplex.ops.paged_attention import paged_decode_attention
from loraplex.ops.paged_attention_ref import paged_decode_attention_ref

LENS = [1, 15, 16, 17, 40, 300]  # windows below, at and above each length


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if DEVICE.type != "cuda":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _direct(q, k_cache, v_cache, tables, lens, scale, window, softcap):
    """One query at a time from the definition: position n - 1 sees keys (n-1-window, n-1]."""
    out = torch.empty(q.shape, dtype=torch.float64)
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // kvh
    for b, n in enumerate(lens.tolist()):
        k = k_cache[tables[b]].reshape(-1, kvh, d)[:n].double()
        v = v_cache[tables[b]].reshape(-1, kvh, d)[:n].double()
        lo = 0 if window is None else max(0, n - window)
        for h in range(q.shape[1]):
            s = [scale * float(k[j, h // group] @ q[b, h].double()) for j in range(lo, n)]
            if softcap is not None:
                s = [softcap * math.tanh(x / softcap) for x in s]
            p = torch.tensor(s, dtype=torch.float64).softmax(0)
            out[b, h] = p @ v[lo:n, h // group]
    return out


@pytest.mark.parametrize("window,softcap", [(7, None), (None, 5.0), (16, 2.0)])
def test_reference_window_and_softcap(window, softcap):
    case = make_case([1, 9, 33], 4, 2, 16 * 2, torch.float32, seed=2)
    case = tuple(t.cpu() if torch.is_tensor(t) else t for t in case)
    want = _direct(*case, window, softcap)
    got = paged_decode_attention_ref(*case, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    if window is not None:  # the window changes the long rows, not the short one
        full = paged_decode_attention_ref(*case, softcap=softcap)
        assert torch.equal(full[0], got[0]) and (full[2] - got[2]).abs().max() > 1e-3


def _check(fn, case, dtype, window, softcap):
    out = torch.full(case[0].shape, float("nan"), dtype=dtype, device=DEVICE)
    got = fn(*case, out=out, sliding_window=window, softcap=softcap)
    assert got is out
    want = paged_decode_attention_ref(*case, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(out, want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window,softcap", [(1, None), (16, None), (37, 3.0), (None, 3.0)])
@pytest.mark.parametrize("sms", [1, 132])  # one split (direct store) / splits + reduce
def test_triton_window_softcap_matches_reference(dtype, window, softcap, sms, monkeypatch):
    monkeypatch.setattr(paged_attention_triton, "_num_sms", lambda device: sms)
    case = make_case(LENS, 8, 2, 64, dtype, width=20, seed=window or 5)
    if sms > 1:  # stale scratch must not leak into the result
        paged_attention_triton._scratch(DEVICE).fill_(float("nan"))
    _check(paged_attention_triton.paged_decode_attention, case, dtype, window, softcap)


def test_triton_window_skips_blocks_before_it():
    """Blocks wholly before the window are never read: NaN there changes nothing."""
    case = list(make_case([100, 64], 4, 4, 64, torch.float32, seed=9, width=8))
    window = 20
    want = paged_decode_attention_ref(*case, sliding_window=window)
    for b, n in enumerate([100, 64]):
        first_block = (n - window) // BLOCK
        for cache in case[1:3]:
            cache[case[3][b, :first_block]] = float("nan")
    got = paged_attention_triton.paged_decode_attention(*case, sliding_window=window)
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("window,softcap", [(1, None), (16, None), (37, 3.0), (None, 3.0)])
def test_torch_window_softcap_matches_reference(dtype, window, softcap):
    case = make_case(LENS, 8, 2, 64, dtype, seed=3)
    _check(paged_attention_torch.paged_decode_attention, case, dtype, window, softcap)
    # the shared per-step mask built for the window gives the same result
    length = case[3].shape[1] * BLOCK
    bias = paged_attention_torch.decode_attention_bias(case[4], length, dtype, window)
    got = paged_decode_attention(*case, backend="torch", attn_bias=bias,
                                 sliding_window=window, softcap=softcap)
    want = paged_decode_attention_ref(*case, sliding_window=window, softcap=softcap)
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


def test_window_must_be_positive():
    case = make_case([3], 4, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="sliding_window=0"):
        paged_decode_attention(*case, backend="torch", sliding_window=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_attention_layers_with_and_without_window_share_a_step(backend):
    """As in Gemma: a global layer, then a windowed soft-capped one, in one decode step. The
    global layer's per-step mask (ForwardBatch.decode_mask) must not leak into the windowed
    layer, nor the window into the global one."""
    from loraplex.layers.attention import Attention
    from loraplex.layers.forward_context import ForwardBatch, forward_context

    heads, kv_heads, d, lens = 8, 2, 64, [25, 1, 70]
    layers = [Attention(0, heads, kv_heads, d),
              Attention(1, heads, kv_heads, d, scale=0.1, sliding_window=9, softcap=3.0)]
    caches, outs = [], []
    for i, layer in enumerate(layers):
        q, kc, vc, tables, ctx, _ = make_case(lens, heads, kv_heads, d, torch.float32,
                                              width=6, seed=20 + i)
        caches.append((kc, vc))
        outs.append((layer, q))
    batch = ForwardBatch(is_prefill=False, num_tokens=len(lens), slot_mapping=None,
                         block_tables=tables, context_lens=ctx, max_context_len=max(lens),
                         kv_caches=caches, attn_backend=backend)
    with forward_context(batch):
        got = [layer(q, None, None) for layer, q in outs]
    for (layer, q), (kc, vc), out in zip(outs, caches, got, strict=True):
        want = paged_decode_attention_ref(q, kc, vc, tables, ctx, layer.scale,
                                          sliding_window=layer.sliding_window,
                                          softcap=layer.softcap)
        torch.testing.assert_close(out, want.reshape(out.shape), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("window,softcap", [(5, None), (None, 2.0), (5, 2.0)])
def test_prefill_window_softcap_in_row_chunks(window, softcap, monkeypatch):
    """The prefill path with a window and/or softcap (scores in chunks of query rows) against
    the definition, one query at a time in float64: query i sees keys (i - window, i]."""
    from loraplex.layers import attention

    monkeypatch.setattr(attention, "_SCORE_ROWS", 8)  # 37 rows: 5 chunks, the last partial
    layer = attention.Attention(0, 4, 2, 16, scale=0.3, sliding_window=window, softcap=softcap)
    g = torch.Generator().manual_seed(4)
    qs, ks, vs = (torch.randn(2, h, 37, 16, generator=g) for h in (4, 2, 2))
    got = layer._masked(qs, ks, vs)
    want = torch.empty(got.shape, dtype=torch.float64)
    for i in range(37):
        lo = 0 if window is None else max(0, i - window + 1)
        k, v = ks[:, :, lo : i + 1].double(), vs[:, :, lo : i + 1].double()
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        s = 0.3 * torch.einsum("bhd,bhjd->bhj", qs[:, :, i].double(), k)
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        want[:, :, i] = torch.einsum("bhj,bhjd->bhd", s.softmax(-1), v)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
