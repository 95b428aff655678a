"""The LoRA op reference (``lora_ref``) and the CPU backend (``lora_torch``) against a naive
float64 per-token loop, swept over stacked slices (n = 1, 2, 3 with uneven widths), per-slot /
per-slice ranks (incl. 0), adapter mixes (incl. scattered slots) and token counts. Unused rank
rows/columns are NaN-poisoned; untouched outputs must not change."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from loraplex.ops import get_lora_ops, lora_cpu, lora_ref, lora_torch, resolve_lora_backend
from loraplex.ops.lora_meta import LoRABatch
from loraplex.ops.lora_testing import (
    PATTERNS,
    build,
    check_expand,
    check_shrink,
    make_case,
    poisoned_h,
)

IMPLS = {"ref": lora_ref, "torch": lora_torch, "cpu": lora_cpu}


@pytest.mark.parametrize("max_rank", [1, 16, 128])
@pytest.mark.parametrize("num_tokens", [1, 3, 7, 16, 133])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_ops_match_naive(impl: str, n: int, pattern: str, num_tokens: int, max_rank: int) -> None:
    case = build(n, num_tokens, pattern, max_rank, seed=n * 1000 + num_tokens + max_rank)
    check_shrink(IMPLS[impl].lora_shrink, case, rtol=1e-5, atol=1e-5)
    check_expand(IMPLS[impl].lora_expand, case, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["decode", "prefill"])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_scattered_slots(n: int, layout: str) -> None:
    """What serving sees: adapters in scattered slots (gaps, not in slot order), segments of
    unequal lengths, equal and unequal ranks, slot -1 tokens in between."""
    per = 1 if layout == "decode" else 5
    ranks = [[8] * n, [0] * n, [8] * n, [4] * n, [8] * n, [2, 8, 5][:n], [8] * n, [0] * n,
             [8] * n, [8] * n, [3] * n, [8] * n]
    order = [11, 2, 9, -1, 5, 0, 3, 6, 10, 4]  # slots 1, 7, 8 unused; -1 in between
    slots = [s for j, s in enumerate(order) for _ in range(per + j % 3)]
    case = make_case(num_tokens=len(slots), in_features=40, widths=(24, 16, 8)[:n],
                     max_rank=8, slot_ranks=ranks, pattern=slots, seed=3 + n, extra_rows=2)
    for impl in IMPLS.values():
        check_shrink(impl.lora_shrink, case, rtol=1e-5, atol=1e-5)
        check_expand(impl.lora_expand, case, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n", [1, 3])
def test_torch_device_rank_path(n: int, pattern: str, dtype: torch.dtype) -> None:
    """The no-sync path (taken when ranks live on an accelerator: unused columns masked on the
    device) gives the same result, and NaN garbage in unused rank columns never leaks."""
    case = build(n, 37, pattern, 16, seed=7 + n, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    check_shrink(lora_torch._shrink_masked, case, rtol=tol, atol=tol)

    def expand(h, b, ranks, scalings, offsets, batch, y):
        lora_torch._expand_masked(h, b, ranks, scalings, offsets, batch, y)

    check_expand(expand, case, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_half_precision_matches_naive(impl: str, dtype: torch.dtype) -> None:
    # bound: one rounding of each output (|x| up to ~4: 4 * eps) plus the rounding of h
    tol = 4 * torch.finfo(dtype).eps
    case = build(3, 133, "zipf", 64, seed=11, dtype=dtype, in_features=512)
    check_shrink(IMPLS[impl].lora_shrink, case, rtol=tol, atol=tol)
    check_expand(IMPLS[impl].lora_expand, case, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_expand_rounds_once(impl: str) -> None:
    """float16 ``y + scaling * h @ B^T`` is rounded once (the sum formed at higher precision),
    not twice (the delta rounded to float16, then the sum). Deltas as large as ``y`` make the
    two differ in a good share of entries, so the test can tell them apart."""
    case = build(1, 64, "zipf", 16, seed=5, dtype=torch.float16, in_features=64,
                 widths=(256,))
    h = poisoned_h(case)
    y0 = torch.randn(h.shape[0], 256, generator=torch.Generator().manual_seed(2)).half()
    y = y0.clone()
    IMPLS[impl].lora_expand(h, case.b, case.ranks, case.scalings, case.offsets, case.batch, y)
    once, twice = y0.clone(), y0.clone()
    ranks, scalings = case.ranks.tolist(), case.scalings.tolist()
    for tok, slot in enumerate(case.token_lora_slots):
        r = ranks[slot][0]
        delta = scalings[slot][0] * (case.b[slot, :, :r].double() @ h[tok, :r].double())
        once[tok] = (y0[tok].double() + delta).half()
        twice[tok] = (y0[tok].double() + delta.half().double()).half()
    assert (once != twice).float().mean() > 0.1  # the test can tell the two apart
    assert (y == once).float().mean() > 0.99  # float32 accumulation order may flip a few
    assert (y == twice).float().mean() < (y == once).float().mean() - 0.1


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_is_one_addmm_per_segment_and_slice(dtype: torch.dtype) -> None:
    """The CPU backend neither copies nor widens weights (no per-call ``.float()`` of A/B,
    no gather, no bmm): per (segment, slice) with r > 0 it issues one in-place ``addmm_`` on
    views, and one per segment for a shrink whose slices are all at full rank."""
    ranks = [[8, 8, 8], [4, 0, 8], [8, 8, 8], [0, 0, 0]]
    slots = [2, 2, 2, 0, -1, 1, 1, 3, 0]  # scattered, unsorted, a repeat of slot 0
    case = make_case(num_tokens=len(slots), in_features=32, widths=(16, 8, 8), max_rank=8,
                     slot_ranks=ranks, pattern=slots, dtype=dtype, seed=1)
    out = torch.zeros(len(slots), 24, dtype=dtype)
    y = torch.zeros(len(slots), 32, dtype=dtype)
    with _OpLog() as log:
        lora_torch.lora_shrink(case.x, case.a, case.ranks, case.batch, out)
        lora_torch.lora_expand(out, case.b, case.ranks, case.scalings, case.offsets,
                               case.batch, y)
    # (detach: ``ranks.numpy()``, the host copy of the ranks, outside inference mode)
    views = {"slice.Tensor", "select.int", "t.default", "permute.default", "transpose.int",
             "_local_scalar_dense.default", "split_with_sizes.default", "detach.default"}
    # bfloat16 copies h's [len, r] slice (a torch GEMM reads past a sliced K): activations only
    compute = [op for op in log.ops if op not in views and op != "clone.default"]
    # shrink: segments 2 (full) + 0 (full) + 1 (2 slices) + 0 (full) = 5;
    # expand: 3 + 3 + 2 + 3 = 11 (slot 3 has rank 0 everywhere)
    assert compute == ["addmm_.default"] * 16, compute
    # bfloat16: one copy per expand GEMM of a multi-token segment (3 + 2); one row is contiguous
    assert log.ops.count("clone.default") == (5 if dtype == torch.bfloat16 else 0)


def test_cpu_weight_views_are_made_once_and_follow_reloads() -> None:
    """The CPU backend keeps its transposed views of pool weights across steps (the same batch
    object): the second call makes no view of a weight at all, and a slot reloaded with new
    values and a new rank (as the slot pool does in place) is read correctly through them."""
    ranks = [[8, 8, 8], [4, 0, 8], [8, 8, 8]]
    slots = [2, 2, 0, 0, 0, -1, 1, 1]
    case = make_case(num_tokens=len(slots), in_features=32, widths=(16, 8, 8), max_rank=8,
                     slot_ranks=ranks, pattern=slots, seed=4)

    def run() -> list[str]:
        out = torch.zeros(len(slots), 24)
        y = torch.zeros(len(slots), 32)
        with _OpLog() as log:
            lora_torch.lora_shrink(case.x, case.a, case.ranks, case.batch, out)
            lora_torch.lora_expand(out, case.b, case.ranks, case.scalings, case.offsets,
                                   case.batch, y)
        return log.ops

    first = run()
    # ``.T`` dispatches as permute: one per weight read (shrink 1 + 1 + 2, expand 3 + 3 + 2)
    assert first.count("permute.default") == 4 + 8
    again = run()
    assert again.count("permute.default") == 0
    assert again.count("select.int") == 0  # no a[slot] / b[slot] either
    # reload slot 2 in place: new values, rank 8 -> 3 on every slice (NaN past the new rank)
    gen = torch.Generator().manual_seed(9)
    case.a[2] = float("nan")
    case.b[2] = float("nan")
    for i, w in enumerate((16, 8, 8)):
        case.a[2, i * 8 : i * 8 + 3] = torch.randn(3, 32, generator=gen)
        case.b[2, case.offsets[i] : case.offsets[i] + w, :3] = torch.randn(w, 3, generator=gen)
    case.ranks[2] = 3
    check_shrink(lora_torch.lora_shrink, case, rtol=1e-5, atol=1e-5)
    check_expand(lora_torch.lora_expand, case, rtol=1e-5, atol=1e-5)


def test_no_adapter_batch_is_noop() -> None:
    case = build(2, 9, [-1] * 9, 8, seed=5)
    assert case.batch.host_segs == []
    for impl in IMPLS.values():
        y = torch.randn(9, case.b.shape[1])
        y0 = y.clone()
        impl.lora_expand(poisoned_h(case), case.b, case.ranks, case.scalings, case.offsets,
                         case.batch, y)
        assert torch.equal(y, y0)


def test_from_token_slots_segments() -> None:
    batch = LoRABatch.from_token_slots([2, 2, -1, 0, 0, 0, 2])
    assert batch.host_segs == [(0, 2, 2), (3, 3, 0), (6, 1, 2)]
    assert batch.num_segs == 4 and batch.max_seg_len == 3 and batch.decode_shaped


def test_backend_resolution() -> None:
    assert resolve_lora_backend("auto", "cpu") == (
        "cpu" if lora_cpu.unavailable_reason() is None else "torch")
    assert get_lora_ops("cpu") == (lora_cpu.lora_shrink, lora_cpu.lora_expand,
                                   lora_cpu.lora_expand_silu_mul, lora_cpu.lora_add_rms_norm,
                                   lora_cpu.lora_rotary_)
    assert resolve_lora_backend("torch", "cpu") == "torch"
    assert get_lora_ops("torch") == (lora_torch.lora_shrink, lora_torch.lora_expand, None, None,
                                     None)
    with pytest.raises(ValueError, match="lora_backend"):
        resolve_lora_backend("cutlass", "cpu")
    with pytest.raises(ValueError, match="lora_backend"):
        get_lora_ops("auto")
