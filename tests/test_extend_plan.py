"""One ``ExtendPlan`` shared by the layers of a forward: every layer (its own caches and q,
its own sliding window and softcap, as Gemma's alternating layers have) equals the float64
reference, as without a plan; the plan's masks are kept per window; the plan is built once."""

from __future__ import annotations

import pytest
import torch
from test_paged_prefill import make_case, random_mix, reference

from loraplex.ops import paged_prefill_torch
from loraplex.ops.paged_prefill_torch import ExtendPlan

# per layer: (sliding_window, softcap); the same window again must reuse its mask
LAYERS = [(None, None), (7, None), (None, 3.0), (7, None), (40, 2.0), (None, None)]


def _layer_cases(prefixes, chunks, seed):
    """The step's metadata once, each layer with its own q and caches."""
    base = make_case(prefixes, chunks, 8, 2, 64, torch.float32, seed=seed)
    cases = []
    for i in range(len(LAYERS)):
        other = make_case(prefixes, chunks, 8, 2, 64, torch.float32, seed=seed + 100 + i)
        cases.append(base | {k: other[k] for k in ("q", "k_cache", "v_cache")})
    return cases


def _run(case, plan, window, softcap, host_context: bool):
    return paged_prefill_torch.paged_prefill_attention(
        case["q"], case["k_cache"], case["v_cache"], case["block_tables"],
        case["cu_seqlens_q"], case["context_lens"], case["scale"],
        max_query_len=case["max_query_len"], max_context_len=case["max_context_len"],
        sliding_window=window, softcap=softcap, cu_seqlens_q_host=case["cu_host"],
        context_lens_host=case["context_lens"].tolist() if host_context else None, plan=plan)


@pytest.mark.parametrize("mix", ["groups", "one padded group", "equal chunks", "no host"])
def test_shared_plan_equals_reference_in_every_layer(mix, monkeypatch):
    monkeypatch.setattr(paged_prefill_torch, "ROW_BLOCK", 16)
    if mix == "groups":  # decodes and long chunks: several groups
        prefixes, chunks = [30, 64, 5, 0, 99, 17], [1, 1, 48, 64, 1, 20]
    elif mix == "equal chunks":  # q in place, no padding
        prefixes, chunks = [3, 40, 19], [12, 12, 12]
    else:
        prefixes, chunks = random_mix(3, batch=4)
        chunks = [max(c, 20) for c in chunks]  # similar lengths: one padded group
    cases = _layer_cases(prefixes, chunks, seed=7)
    if mix == "no host":  # the layout derived on the device
        cases = [c | {"cu_host": None} for c in cases]
    plan = ExtendPlan()
    for case, (window, softcap) in zip(cases, LAYERS, strict=True):
        got = _run(case, plan, window, softcap, host_context=mix == "groups")
        want = reference(case, sliding_window=window, softcap=softcap)
        alone = _run(case, None, window, softcap, host_context=mix == "groups")
        assert (got - want).abs().max() <= 2e-5, (mix, window, softcap)
        assert torch.equal(got, alone)
    expect_groups = len(paged_prefill_torch.plan_groups(chunks)) if mix == "groups" else 1
    assert len(plan.groups) == expect_groups
    # one mask per group and window (None, 7, 40), not per layer
    assert sorted({w for _, w in plan.masks}, key=str) == [40, 7, None]
    assert len(plan.masks) == 3 * expect_groups


def test_plan_is_built_once_per_step(monkeypatch):
    calls = []
    real = paged_prefill_torch._plan
    monkeypatch.setattr(paged_prefill_torch, "_plan",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    cases = _layer_cases([10, 0, 70], [1, 33, 1], seed=3)
    plan = ExtendPlan()
    for case, (window, softcap) in zip(cases, LAYERS, strict=True):
        _run(case, plan, window, softcap, host_context=True)
    assert len(calls) == 1
    with pytest.raises(AssertionError):  # another step's tokens: the plan is not theirs
        other = make_case([10, 0], [1, 5], 8, 2, 64, torch.float32)
        _run(other, plan, None, None, host_context=True)
