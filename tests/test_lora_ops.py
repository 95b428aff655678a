"""The torch reference LoRA ops against a naive float64 per-token loop, swept over stacked
slices (n = 1, 2, 3 with uneven widths), per-slot/per-slice ranks (incl. 0), adapter mixes and
token counts. Unused rank rows/columns are NaN-poisoned; untouched outputs must not change."""

from __future__ import annotations

import pytest
import torch

from loraplex.ops import get_lora_ops, lora_ref, resolve_lora_backend
from loraplex.ops.lora_meta import LoRABatch
from loraplex.ops.lora_testing import PATTERNS, build, check_expand, check_shrink, poisoned_h


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


def test_backend_resolution() -> None:
    assert resolve_lora_backend("auto", "cpu") == "torch"
    assert resolve_lora_backend("torch", "cpu") == "torch"
    assert get_lora_ops("torch") == (lora_ref.lora_shrink, lora_ref.lora_expand)
    with pytest.raises(ValueError, match="lora_backend"):
        resolve_lora_backend("cutlass", "cpu")
    with pytest.raises(ValueError, match="lora_backend"):
        get_lora_ops("auto")


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("layout", ["decode", "prefill"])
def test_reference_runs_of_consecutive_slots(n: int, layout: str) -> None:
    """The CPU path batches runs of consecutive slots with equal lengths and ranks into one
    bmm: runs break on a rank change, a length change, a gap in slots and slot -1 tokens;
    scalings differ per slot inside a run; unused (NaN) rank columns stay unread."""
    from loraplex.ops.lora_testing import make_case

    per = 1 if layout == "decode" else 3
    ranks = [[8] * n, [8] * n, [8] * n, [4] * n, [4] * n, [8] * n, [0] * n, [8] * n, [8] * n]
    order = [0, 1, 2, 3, 4, 5, -1, 7, 8]  # slot 6 skipped: a gap; -1 in between
    slots = [s for s in order for _ in range(per)] + [8] * (per + 1)  # last run: longer segment
    case = make_case(num_tokens=len(slots), in_features=40, widths=(24, 16, 8)[:n],
                     max_rank=8, slot_ranks=ranks, pattern=slots, seed=3 + n, extra_rows=2)
    runs = lora_ref._runs(case.batch, case.ranks.tolist())
    assert [r[3] for r in runs][:2] == [3, 2]  # slots 0-2 (rank 8), slots 3-4 (rank 4)
    check_shrink(lora_ref.lora_shrink, case, rtol=1e-5, atol=1e-5)
    check_expand(lora_ref.lora_expand, case, rtol=1e-5, atol=1e-5)
