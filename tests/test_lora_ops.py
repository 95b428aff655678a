"""The torch reference LoRA ops against a naive float64 per-token loop, swept over stacked
slices (n = 1, 2, 3 with uneven widths), per-slot/per-slice ranks (incl. 0), adapter mixes and
token counts. Unused rank rows/columns are NaN-poisoned; untouched outputs must not change."""

from __future__ import annotations

import random

import pytest
import torch

from loraplex.ops import lora_ref
from loraplex.ops.lora_meta import LoRABatch
from loraplex.ops.lora_testing import (
    PATTERNS,
    LoRACase,
    make_case,
    naive_expand,
    naive_shrink,
    poisoned_h,
    touched_rows,
    written_mask,
)

WIDTHS = {1: (72,), 2: (56, 40), 3: (96, 32, 32)}
IN_FEATURES = 80


def random_ranks(num_slots: int, n: int, max_rank: int, rng: random.Random) -> list[list[int]]:
    """Per-slot, per-slice ranks in 0..max_rank: full, partial and untargeted (0) slices."""
    ranks = [[rng.choice([0, max_rank, rng.randint(1, max_rank)]) for _ in range(n)]
             for _ in range(num_slots)]
    ranks[0] = [max_rank] * n  # at least one fully targeted adapter
    if num_slots > 2:
        ranks[-1] = [0] * n  # an adapter that targets none of these slices
    return ranks


def build(n: int, num_tokens: int, pattern: str, max_rank: int, seed: int,
          dtype: torch.dtype = torch.float32, device: str = "cpu", in_features: int = IN_FEATURES,
          widths: tuple[int, ...] | None = None, num_slots: int = 6) -> LoRACase:
    rng = random.Random(seed)
    return make_case(
        num_tokens=num_tokens, in_features=in_features, widths=widths or WIDTHS[n],
        max_rank=max_rank, slot_ranks=random_ranks(num_slots, n, max_rank, rng),
        pattern=pattern, dtype=dtype, device=device, seed=seed, extra_rows=2,
    )


def check_shrink(shrink, case: LoRACase, rtol: float, atol: float) -> None:
    t, cols = len(case.token_slots), case.a.shape[1]
    gen = torch.Generator().manual_seed(3)
    out0 = torch.randn(t, cols, generator=gen).to(case.x.device, case.x.dtype)
    out = out0.clone()
    shrink(case.x, case.a, case.ranks, case.batch, out)
    ref = naive_shrink(case, out0)
    mask = written_mask(case)
    got = out.cpu()
    assert torch.equal(got[~mask], out0.cpu()[~mask]), "shrink wrote outside its ranks/tokens"
    torch.testing.assert_close(got[mask].double(), ref[mask], rtol=rtol, atol=atol)


def check_expand(expand, case: LoRACase, rtol: float, atol: float) -> None:
    t, out_features = len(case.token_slots), case.b.shape[1]
    gen = torch.Generator().manual_seed(4)
    y0 = torch.randn(t, out_features, generator=gen).to(case.x.device, case.x.dtype)
    y = y0.clone()
    h = poisoned_h(case)
    expand(h, case.b, case.ranks, case.scalings, case.offsets, case.batch, y)
    ref = naive_expand(case, h, y0)
    rows = touched_rows(case)
    got = y.cpu()
    assert torch.equal(got[~rows], y0.cpu()[~rows]), "expand changed rows without an adapter"
    assert not got.isnan().any(), "expand read a poisoned (unused) entry"
    torch.testing.assert_close(got[rows].double(), ref[rows], rtol=rtol, atol=atol)


@pytest.mark.parametrize("max_rank", [1, 16, 128])
@pytest.mark.parametrize("num_tokens", [1, 3, 7, 16, 133])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_reference_matches_naive(n: int, pattern: str, num_tokens: int, max_rank: int) -> None:
    case = build(n, num_tokens, pattern, max_rank, seed=n * 1000 + num_tokens + max_rank)
    check_shrink(lora_ref.lora_shrink, case, rtol=1e-5, atol=1e-5)
    check_expand(lora_ref.lora_expand, case, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n", [1, 3])
def test_reference_device_rank_path(monkeypatch, n: int, pattern: str, dtype: torch.dtype) -> None:
    """The no-sync path (ranks stay on the device, unused columns masked) gives the same
    result, and NaN garbage in unused rank columns never leaks into outputs."""
    monkeypatch.setattr(lora_ref, "_host_list", lambda t: None)
    case = build(n, 37, pattern, 16, seed=7 + n, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    check_shrink(lora_ref.lora_shrink, case, rtol=tol, atol=tol)
    check_expand(lora_ref.lora_expand, case, rtol=tol, atol=tol)


def test_reference_half_precision_rounds_once() -> None:
    """bf16 inputs: float32 accumulation, one rounding into y (error ~ bf16 epsilon)."""
    case = build(3, 133, "zipf", 64, seed=11, dtype=torch.bfloat16, in_features=512)
    check_shrink(lora_ref.lora_shrink, case, rtol=1e-2, atol=1e-2)
    check_expand(lora_ref.lora_expand, case, rtol=1e-2, atol=1e-2)


def test_reference_no_adapter_batch_is_noop() -> None:
    case = build(2, 9, [-1] * 9, 8, seed=5)
    assert case.batch.host_segs == []
    y = torch.randn(9, case.b.shape[1])
    y0 = y.clone()
    lora_ref.lora_expand(poisoned_h(case), case.b, case.ranks, case.scalings, case.offsets,
                         case.batch, y)
    assert torch.equal(y, y0)


def test_from_token_slots_segments() -> None:
    batch = LoRABatch.from_token_slots([2, 2, -1, 0, 0, 0, 2])
    assert batch.host_segs == [(0, 2, 2), (3, 3, 0), (6, 1, 2)]
    assert batch.num_segs == 4 and batch.max_seg_len == 3 and batch.decode_shaped
