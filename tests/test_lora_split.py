"""The CPU ops' two-thread segment split (``ops.lora_split``): the halves cover every row
once, the split ops match the naive float64 oracle (NaN-poisoned unused ranks, rows without
an adapter untouched), a helper-thread error reaches the caller, one thread starts nothing,
and an engine whose ops split gives PEFT's logits."""

from __future__ import annotations

import gc
import threading

import pytest
import torch
from helpers_lora import make_peft_adapter, make_tiny_model, peft_reference

from loraplex import LLM
from loraplex.ops import lora_torch
from loraplex.ops.lora_split import SegmentSplit, halves
from loraplex.ops.lora_testing import PATTERNS, build, check_expand, check_shrink, make_case


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _rows(segs) -> list[tuple[int, int]]:
    return [(start + i, slot) for start, length, slot in segs for i in range(length)]


@pytest.mark.parametrize("segs", [
    [(0, 3, 5), (3, 4, 1), (8, 2, 0)],  # row 7 has no adapter
    [(0, 1024, 2)],  # one adapter: cut inside the segment
    [(i, 1, i) for i in range(7)],  # decode: one row per adapter, odd count
    [(4, 2, 9)],
])
def test_halves_cut_at_the_middle_row(segs) -> None:
    first, second = halves(segs)
    assert _rows(first) + _rows(second) == _rows(segs)  # every row once, in order, same slot
    assert len(_rows(first)) == len(_rows(segs)) // 2
    assert all(length > 0 for _, length, _ in first + second)


def test_halves_of_one_row_or_none() -> None:
    assert halves([(3, 1, 0)]) == ([], [(3, 1, 0)])
    assert halves([]) == ([], [])


@pytest.mark.parametrize("num_tokens", [2, 7, 40, 133])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n", [1, 3])
def test_split_ops_match_naive(two_threads, n: int, pattern: str, num_tokens: int) -> None:
    case = build(n, num_tokens, pattern, 16, seed=n * 100 + num_tokens)
    case.batch.split = SegmentSplit()
    check_shrink(lora_torch.lora_shrink, case, rtol=1e-5, atol=1e-5)
    check_expand(lora_torch.lora_expand, case, rtol=1e-5, atol=1e-5)
    rows = sum(length for _, length, _ in case.batch.host_segs)
    # decode-shaped batches (segments of <= 4 rows) run unsplit: nothing to save there
    started = rows >= 2 and not case.batch.decode_shaped
    assert (case.batch.split._thread is not None) == started


@pytest.mark.parametrize("n", [1, 2, 3])
def test_split_prefill_with_gaps_and_rank_mix(two_threads, n: int) -> None:
    """Scattered slots, rows without an adapter between segments (and at the cut), a slot
    with rank 0 and uneven per-slice ranks: the split ops still match the oracle."""
    ranks = [[8] * n, [0] * n, [2, 8, 5][:n], [4] * n, [8] * n]
    slots = [4] * 9 + [-1] * 6 + [2] * 11 + [1] * 5 + [-1] * 3 + [0] * 8 + [3] * 7
    case = make_case(num_tokens=len(slots), in_features=40, widths=(24, 16, 8)[:n],
                     max_rank=8, slot_ranks=ranks, pattern=slots, seed=5 + n, extra_rows=2)
    case.batch.split = SegmentSplit()
    assert not case.batch.decode_shaped
    check_shrink(lora_torch.lora_shrink, case, rtol=1e-5, atol=1e-5)
    check_expand(lora_torch.lora_expand, case, rtol=1e-5, atol=1e-5)
    assert case.batch.split._thread is not None


@pytest.mark.parametrize(("threads", "caller", "helper"), [(2, 1, 1), (3, 1, 2), (4, 2, 2)])
def test_split_shares_the_threads_out(threads: int, caller: int, helper: int) -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        split, seen = SegmentSplit(), []

        def fn(part):
            seen.append((threading.get_ident(), torch.get_num_threads(), part))

        split.run(fn, [(0, 4, 1), (4, 4, 3)])
        (t1, n1, p1), (t2, n2, p2) = sorted(seen, key=lambda s: s[2][0][0])
        assert p1 == [(0, 4, 1)] and p2 == [(4, 4, 3)]
        assert t1 == threading.get_ident() != t2 and (n1, n2) == (caller, helper)
        assert torch.get_num_threads() == threads  # the caller's count is back
    finally:
        torch.set_num_threads(before)


def test_helper_error_reaches_the_caller(two_threads) -> None:
    split = SegmentSplit()

    def fn(part):
        if part[0][0] >= 4:  # the second half: the helper's
            raise ValueError("helper failed")

    with pytest.raises(ValueError, match="helper failed"):
        split.run(fn, [(0, 4, 1), (4, 4, 3)])
    done = []
    split.run(lambda part: done.append(part), [(0, 4, 1), (4, 4, 3)])  # still serving
    assert sorted(done) == [[(0, 4, 1)], [(4, 4, 3)]]


def test_one_thread_runs_inline() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        split, seen = SegmentSplit(), []
        split.run(lambda part: seen.append(part), [(0, 4, 1), (4, 4, 3)])
        assert seen == [[(0, 4, 1), (4, 4, 3)]] and split._thread is None
    finally:
        torch.set_num_threads(before)


def test_engine_with_split_ops_equals_peft(two_threads, tmp_path) -> None:
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    dirs = {name: make_peft_adapter(hf, tmp_path / name, seed=i, r=r, lora_alpha=2 * r,
                                    b_scale=0.5)
            for i, (name, r) in enumerate([("a", 4), ("b", 8), ("c", 16)])}
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_loras_per_batch=4, max_lora_rank=16)
    assert llm.engine.lora_batches.batch.split is not None
    names = ["a", "c", None, "b", "c", "a"]
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(4, 120, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 20, (len(names),), generator=g)]
    scores = llm.score(prompts, adapters=names)
    assert llm.engine.lora_batches.batch.split._thread is not None  # the split ran
    refs = {name: peft_reference(hf, dirs[name]) for name in dirs}
    for ids, name, logits in zip(prompts, names, scores, strict=True):
        model = hf if name is None else refs[name]
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float()
        err = (logits - ref).abs().max().item()
        assert err <= 1e-4 * ref.abs().max().item(), (name, err)


def test_helper_ends_with_its_split(two_threads) -> None:
    split = SegmentSplit()
    split.run(lambda part: None, [(0, 4, 1), (4, 4, 3)])
    helper = split._thread
    assert helper is not None and helper.is_alive()
    del split
    gc.collect()
    helper.join(timeout=10)
    assert not helper.is_alive()
