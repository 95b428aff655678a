"""Prefill attention: sequences grouped into batched causal calls (contiguous or right-padded)
give, token for token, what attention over each sequence alone gives."""

from __future__ import annotations

import pytest
import torch

from loraplex.layers import attention
from loraplex.layers.attention import Attention
from loraplex.layers.forward_context import ForwardBatch, forward_context
from loraplex.layers.prefill_groups import plan_prefill

HEADS, KV_HEADS, D = 6, 2, 16


def _cu(lengths: list[int]) -> list[int]:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return cu


def _reference(q, k, v, cu) -> torch.Tensor:
    """Each sequence alone, written out: repeated kv heads, causal mask, softmax."""
    out = torch.empty_like(q)
    group = HEADS // KV_HEADS
    for a, b in zip(cu[:-1], cu[1:]):
        qs = q[a:b].transpose(0, 1).double()  # [heads, n, d]
        ks = k[a:b].transpose(0, 1).double().repeat_interleave(group, dim=0)
        vs = v[a:b].transpose(0, 1).double().repeat_interleave(group, dim=0)
        scores = qs @ ks.transpose(1, 2) * D**-0.5
        n = b - a
        scores.masked_fill_(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        out[a:b] = (scores.softmax(-1) @ vs).transpose(0, 1).to(q.dtype)
    return out


def _covered(plan) -> list[int]:
    tokens = []
    for g in plan:
        if g.gather is None:
            tokens += range(g.start, g.start + g.covers)
        else:
            tokens += g.dest.tolist()
    return sorted(tokens)


@pytest.mark.parametrize("lengths", [
    [128] * 4,  # one contiguous call
    [1],
    [5, 100, 5],  # equal lengths that are not neighbours: one gathered call
    [17, 16, 15, 3, 1, 40, 39, 16],  # padded groups of similar length
    [7, 7, 7, 30, 7, 7],  # two contiguous runs of 7 and one of 30
])
@pytest.mark.parametrize("max_waste", [1.25, 1e9])  # 1e9: every sequence in one padded call
@pytest.mark.parametrize("gqa_in_kernel", [True, False])  # False: k/v heads repeated (CUDA fp32)
def test_grouped_prefill_attention_matches_each_sequence_alone(lengths, max_waste, gqa_in_kernel,
                                                               monkeypatch):
    if not gqa_in_kernel:
        monkeypatch.setattr(attention, "_gqa_in_kernel", lambda q: False)
    g = torch.Generator().manual_seed(len(lengths))
    cu = _cu(lengths)
    t = cu[-1]
    # q, k, v as views of one fused qkv row, as the model passes them
    qkv = torch.randn(t, (HEADS + 2 * KV_HEADS) * D, generator=g)
    q = qkv[:, : HEADS * D].view(t, HEADS, D)
    k = qkv[:, HEADS * D : (HEADS + KV_HEADS) * D].view(t, KV_HEADS, D)
    v = qkv[:, (HEADS + KV_HEADS) * D :].view(t, KV_HEADS, D)
    plan = plan_prefill(cu, torch.device("cpu"), max_waste=max_waste)
    assert _covered(plan) == list(range(t))  # every token written exactly once
    batch = ForwardBatch(is_prefill=True, num_tokens=t, slot_mapping=None, cu_seqlens=cu,
                         prefill_groups=plan)
    with forward_context(batch):
        out = Attention(0, HEADS, KV_HEADS, D)(q, k, v)
    ref = _reference(q, k, v, cu).reshape(t, HEADS * D)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_plan_groups_similar_lengths_and_keeps_neighbours_as_views():
    cpu = torch.device("cpu")
    (only,) = plan_prefill(_cu([64] * 8), cpu)
    assert (only.size, only.length, only.start, only.gather) == (8, 64, 0, None)
    # 100 is alone (pairing it with a 5 would waste ~2x); the two 5s share a gathered call
    plan = plan_prefill(_cu([5, 100, 5]), cpu)
    assert [(p.size, p.length, p.gather is None) for p in plan] == [
        (1, 100, True), (2, 5, False)]
    # similar lengths share one padded call; the padded rows repeat each sequence's last token
    (padded,) = plan_prefill(_cu([8, 7]), cpu)
    assert padded.gather.tolist() == list(range(15)) + [14]
    assert padded.rows.tolist() == list(range(15))
    assert padded.dest.tolist() == list(range(15))
    assert len(plan_prefill(_cu([4, 3]), cpu)) == 2  # 2 * 4^2 > 1.25 * (4^2 + 3^2)
