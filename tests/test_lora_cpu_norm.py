"""RMSNorm in C on CPU float32 (``elementwise.cpu_rms_norm``, what the base model runs) and the
LoRA expand and shrink fused into it (``lora_cpu.lora_add_rms_norm``), wired into a model by
``lora/layers.LoRANorm``: against float64 references and against the unfused path."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch
from helpers_cpu import CAN_BUILD, needs_simd

from loraplex.ops import lora_cpu
from loraplex.ops.elementwise import cpu_rms_norm
from loraplex.ops.lora_testing import (
    build,
    check_declines_when_disabled,
    make_case,
    naive_expand,
    naive_shrink,
    poisoned_h,
    random_ranks,
    written_mask,
)

EPS = 1e-6


def norm64(v: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    v = v.double()
    return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + EPS) * w.double()


def rand(gen: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * scale


@needs_simd
def test_cpu_rms_norm_against_float64(torch_threads: int) -> None:
    """Widths past 16-wide vectors and row counts past 16-row blocks, with and without the
    residual add, strided rows: the sum written into x exactly as torch adds, the norm within
    rounding of float64 and of torch's float32 ops."""
    from loraplex.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(0)
    for rows, hidden in [(1, 1), (3, 15), (17, 16), (40, 77), (5, 1024), (33, 64)]:
        w = rand(g, hidden) + 1
        for with_res in (False, True):
            x0 = rand(g, rows, hidden + 3)[:, :hidden]  # row stride past the width
            res = rand(g, rows, hidden) if with_res else None
            x = x0.clone()
            out = cpu_rms_norm(x, w, EPS, res)
            want_sum = x0 + res if with_res else x0
            assert torch.equal(x, want_sum), "the sum is not what torch's add gives"
            torch.testing.assert_close(out.double(), norm64(want_sum, w), rtol=2e-6, atol=1e-6)
            ref = RMSNorm(hidden, EPS)
            ref.weight.data = w
            torch.testing.assert_close(out, ref._torch(want_sum), rtol=2e-6, atol=1e-6)


def test_cpu_rms_norm_declines_what_it_does_not_cover(monkeypatch) -> None:
    """None, writing nothing (the layer runs torch's ops): half precision, a 1-D input, a column
    stride, a weight of another dtype or width, a residual of another shape, no AVX-512,
    LORAPLEX_FUSED_ELEMENTWISE=0."""
    w = torch.ones(8)
    x = torch.randn(4, 8)
    x0 = x.clone()
    assert cpu_rms_norm(x.bfloat16(), w.bfloat16(), EPS) is None
    assert cpu_rms_norm(x[0], w, EPS) is None
    assert cpu_rms_norm(torch.randn(8, 4).t(), w, EPS) is None
    assert cpu_rms_norm(x, w.double(), EPS) is None
    assert cpu_rms_norm(x, torch.ones(7), EPS) is None
    assert cpu_rms_norm(x, w, EPS, torch.randn(3, 8)) is None
    assert torch.equal(x, x0)
    monkeypatch.setenv("LORAPLEX_FUSED_ELEMENTWISE", "0")
    assert cpu_rms_norm(x, w, EPS, torch.randn(4, 8)) is None
    monkeypatch.delenv("LORAPLEX_FUSED_ELEMENTWISE")
    if CAN_BUILD and not isinstance(lora_cpu._native(), str):
        monkeypatch.setattr(lora_cpu._native(), "simd", 0)
        assert cpu_rms_norm(x, w, EPS, torch.randn(4, 8)) is None
    assert torch.equal(x, x0)


def norm_case(pattern, tokens: int, hidden: int, rank: int, seed: int):
    """(the expand of the projection before the norm: one slice of ``hidden`` columns, the
    shrink of the projection after it: two slices, over the same rows), random ranks incl. 0."""
    pre = build(1, tokens, pattern, rank, seed=seed, widths=(hidden,))
    post = make_case(num_tokens=tokens, in_features=hidden, widths=(24, 8), max_rank=rank,
                     slot_ranks=random_ranks(pre.ranks.shape[0], 2, rank, random.Random(seed)),
                     pattern=pre.token_lora_slots, seed=10 + seed)
    return pre, post


CASES = [("some_none", 40, 77, 8), ("zipf", 300, 160, 16), ("distinct", 7, 33, 16),
         ([3] * 61 + [-1] * 3 + [0] * 9, 73, 1024, 16), ([0, 1, -1, 2, 3, 1], 6, 64, 4)]


@needs_simd
@pytest.mark.parametrize("parts", ["both", "before", "then"])
def test_fused_norm_equals_expand_add_norm_shrink(torch_threads: int, parts: str) -> None:
    """``lora_add_rms_norm`` against float64: x ends as its base value plus the LoRA delta
    plus the residual; out is the norm of that sum; h2 the next shrink of out. Per-slot
    ranks incl. 0 and partial (NaN poison past them never read), long items and one-row
    items (decode), base rows (exactly ``cpu_rms_norm``'s values), a strided h2 of which only
    the shrink's entries are written; with the expand alone and the shrink alone."""
    for k, (pattern, tokens, hidden, rank) in enumerate(CASES):
        pre, post = norm_case(pattern, tokens, hidden, rank, seed=k)
        g = torch.Generator().manual_seed(k)
        x0, res, w = rand(g, tokens, hidden), rand(g, tokens, hidden), rand(g, hidden) + 1
        h = poisoned_h(pre)
        h2 = torch.full((tokens, rank * 2 + 5), float("nan"))[:, 3 : 3 + 2 * rank]
        before = (h, pre.b, pre.ranks, pre.scalings, pre.offsets, None)
        then = (post.a, post.ranks, h2)
        x = x0.clone()
        out = lora_cpu.lora_add_rms_norm(x, res, w, EPS, pre.batch,
                                         before if parts != "then" else None,
                                         then if parts != "before" else None)
        want_sum = (naive_expand(pre, h, x0) if parts != "then" else x0.double()) + res
        torch.testing.assert_close(x.double(), want_sum, rtol=1e-5, atol=1e-5)
        assert not out.isnan().any(), "a poisoned (unused) entry leaked in"
        torch.testing.assert_close(out.double(), norm64(x, w), rtol=2e-6, atol=1e-6)
        base = torch.tensor([s < 0 for s in pre.token_lora_slots])
        plain = (x0 + res)[base]
        assert torch.equal(x[base], plain)
        assert torch.equal(out[base], cpu_rms_norm(plain.clone(), w, EPS))
        mask = written_mask(post)
        if parts == "before":
            assert h2.isnan().all(), "wrote a shrink it was not given"
            continue
        assert h2[~mask].isnan().all(), "wrote an entry the shrink does not write"
        want = naive_shrink(replace(post, x=out), h2)
        torch.testing.assert_close(h2[mask].double(), want[mask], rtol=1e-5, atol=1e-5)


@needs_simd
def test_fused_norm_without_a_residual() -> None:
    """The first layer's norm (no residual add, x only read): the next shrink fused in."""
    pre, post = norm_case("zipf", 50, 96, 8, seed=3)
    x = torch.randn(50, 96)
    x0 = x.clone()
    h2 = torch.full((50, 16), float("nan"))
    w = torch.rand(96) + 0.5
    out = lora_cpu.lora_add_rms_norm(x, None, w, EPS, pre.batch, None, (post.a, post.ranks, h2))
    assert torch.equal(x, x0)
    assert torch.equal(out, cpu_rms_norm(x0.clone(), w, EPS))
    mask = written_mask(post)
    want = naive_shrink(replace(post, x=out), h2)
    torch.testing.assert_close(h2[mask].double(), want[mask], rtol=1e-5, atol=1e-5)


def test_fused_norm_declines_where_it_does_not_apply(monkeypatch) -> None:
    """None, with x untouched, for an expand of two slices, half precision, a pool the C code
    does not take, no AVX-512 or LORAPLEX_FUSED_ELEMENTWISE=0: ``LoRANorm`` then runs the
    expand, the norm and the shrink apart."""
    pre, post = norm_case("distinct", 9, 32, 4, seed=1)
    two = build(2, 9, "distinct", 4, seed=1, widths=(16, 16))
    x, res, w = torch.randn(9, 32), torch.randn(9, 32), torch.ones(32)
    x0 = x.clone()
    h = poisoned_h(pre)

    def run(before=(h, pre.b, pre.ranks, pre.scalings, pre.offsets, None), xx=x, ww=w):
        return lora_cpu.lora_add_rms_norm(xx, res, ww, EPS, pre.batch, before, None)

    assert run((poisoned_h(two), two.b, two.ranks, two.scalings, two.offsets, None)) is None
    assert run(xx=x.bfloat16()) is None
    assert run((h, pre.b.double(), pre.ranks, pre.scalings, pre.offsets, None)) is None
    assert run(ww=torch.ones(31)) is None
    check_declines_when_disabled(monkeypatch, run)
    assert torch.equal(x, x0)


def lora_pair(t: int, hidden: int, inter: int, rank: int, g: torch.Generator):
    """An o-like ``LoRALinear`` (one slice, row-parallel kind) and a gate/up one sharing a
    scratch, with per-slot ranks incl. 0 and partial."""
    from loraplex.layers.linear import MergedColumnLinear, RowLinear
    from loraplex.lora.buffers import SlotBuffers
    from loraplex.lora.layers import LoRALinear
    from loraplex.ops import get_lora_ops

    ops = get_lora_ops("cpu")
    scratch = torch.zeros(t, 3 * rank)
    o = RowLinear(hidden, hidden)
    o.weight.data = rand(g, hidden, hidden, scale=0.1)
    wo = LoRALinear(o, SlotBuffers(rand(g, 4, rank, hidden, scale=0.1),
                                   rand(g, 4, hidden, rank, scale=0.1),
                                   torch.tensor([[8], [0], [3], [8]], dtype=torch.int32),
                                   torch.rand(4, 1, generator=g) + 0.5, (0, hidden), None),
                    scratch, ops)
    gu = MergedColumnLinear(hidden, [inter, inter], ["gate", "up"])
    gu.weight.data = rand(g, 2 * inter, hidden, scale=0.1)
    wgu = LoRALinear(gu, SlotBuffers(rand(g, 4, 2 * rank, hidden, scale=0.1),
                                     rand(g, 4, 2 * inter, rank, scale=0.1),
                                     torch.tensor([[8, 8], [3, 0], [0, 0], [8, 5]],
                                                  dtype=torch.int32),
                                     torch.rand(4, 2, generator=g) + 0.5,
                                     (0, inter, 2 * inter), None), scratch, ops)
    wgu.pre_cols = slice(rank, 3 * rank)  # past o's own shrink output
    return wo, wgu, ops


@needs_simd
def test_lora_norm_fused_equals_the_plain_path() -> None:
    """``LoRANorm`` between two ``LoRALinear``: o's expand left to the norm, gate/up's shrink
    made by it (its own shrink not called), against the same wrappers with the fused op off
    (expand, norm, shrink apart): the same values within rounding; and a projection output
    that reaches the norm changed is an error, not a lost delta."""
    from loraplex.layers.forward_context import ForwardBatch, forward_context
    from loraplex.layers.norm import RMSNorm
    from loraplex.lora.layers import LoRANorm
    from loraplex.ops.lora_meta import LoRABatch

    hidden, inter, rank, t = 64, 40, 8, 40
    g = torch.Generator().manual_seed(0)
    wo, wgu, ops = lora_pair(t, hidden, inter, rank, g)
    base = RMSNorm(hidden, EPS)
    base.weight.data = torch.rand(hidden, generator=g) + 0.5
    norm = LoRANorm(base, wo, wgu, ops.add_rms_norm)
    assert wo.defer_to is norm
    xa, res = rand(g, t, hidden), rand(g, t, hidden)
    slots = [0] * 6 + [-1] * 4 + [3] * 20 + [1] * 9 + [2]

    def run():
        h, summed = norm.add_forward(wo(xa), res.clone())
        return wgu(h), summed

    with forward_context(ForwardBatch(is_prefill=True, num_tokens=t, slot_mapping=None,
                                      lora=LoRABatch.from_token_slots(slots))):
        calls = []
        wgu.shrink = lambda *args: calls.append(1) or ops.shrink(*args)
        fused, fused_sum = run()
        assert not calls  # gate/up's shrink ran inside the norm
        norm.add_rms_norm = None
        plain, plain_sum = run()
        assert calls
        torch.testing.assert_close(fused_sum, plain_sum, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
        with pytest.raises(RuntimeError, match="did not reach the layer"):
            norm.add_forward(wo(xa).clone(), res.clone())
        wo(xa)  # a step that fails between the projection and its norm ...
    with forward_context(ForwardBatch(is_prefill=True, num_tokens=t, slot_mapping=None,
                                      lora=None)):
        h, _ = norm.add_forward(wo(xa), res.clone())  # ... leaves the next step unharmed
        torch.testing.assert_close(h, base.add_forward(wo.base(xa), res.clone())[0])
