"""The batched sampler against a plain sort-based reference written here: exact kept sets,
exact distributions (chi-square), seeds independent of the batch, greedy = argmax, and
non-finite rows reported without raising."""

from __future__ import annotations

import pytest
import torch

from loraplex import SamplingParams
from loraplex.engine import sampling_ops as ops
from loraplex.engine.sampler import Sampler
from loraplex.engine.sequence import Sequence


def _seq(i: int, params: SamplingParams, seed: int | None = None, step: int = 0) -> Sequence:
    s = Sequence(i, f"r{i}", [1], params, seed=seed if seed is not None else 1000 + i)
    s.output_token_ids = [0] * step
    return s


def reference_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row: temperature -> top-k -> top-p -> min-p by a full sort, in float64."""
    if p.temperature == 0:
        out = torch.zeros_like(logits, dtype=torch.float64)
        out[logits.argmax()] = 1.0
        return out
    s = logits.double() / p.temperature
    if 0 < p.top_k < s.numel():
        s = s.masked_fill(s < s.sort(descending=True).values[p.top_k - 1], float("-inf"))
    probs = torch.softmax(s, dim=-1)
    if p.top_p < 1:
        sp, _ = probs.sort(descending=True)
        last = int((sp.cumsum(0) < p.top_p).sum())  # first index whose running mass reaches it
        probs = probs.masked_fill(probs < sp[min(last, len(sp) - 1)], 0.0)
        probs /= probs.sum()
    if p.min_p > 0:
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def _draw(sampler: Sampler, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    out = sampler(logits, seqs)
    assert all(out.finite)
    return out.token_ids


PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=3),
    SamplingParams(temperature=1.0, top_p=0.8),
    SamplingParams(temperature=0.9, min_p=0.2),
    SamplingParams(temperature=1.2, top_k=6, top_p=0.7, min_p=0.05),
    SamplingParams(temperature=2.0, top_p=0.95, min_p=0.1),
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: f"T{p.temperature}-k{p.top_k}-"
                                                        f"p{p.top_p}-m{p.min_p}")
@pytest.mark.parametrize("candidates,block", [(4, 4), (1024, 1024)])
def test_distribution_matches_reference_chi_square(params, candidates, block):
    """Each of 20000 rows draws once with its own seed; counts against the reference.
    candidates=4 sends most filtered rows through the exact rerun; block=4 splits the
    unfiltered rows' race over 3 blocks (the last one padded)."""
    vocab, n = 10, 20000
    logits = torch.tensor([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -1.0, -2.0, 0.9, 1.1])
    probs = reference_probs(logits, params)
    seqs = [_seq(i, params, seed=i) for i in range(n)]
    counts = torch.bincount(torch.tensor(_draw(Sampler(candidates=candidates, block=block),
                                               logits.expand(n, vocab), seqs)), minlength=vocab)
    assert (counts[probs == 0] == 0).all(), "a token outside the kept set was drawn"
    kept = probs > 0
    expected = probs[kept] * n
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    # 99.9% quantiles of chi-square with df = kept - 1 (fixed seeds: the test is deterministic)
    critical = {0: 0.0, 1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32,
                8: 26.12, 9: 27.88}[int(kept.sum()) - 1]
    assert chi2 <= critical, (chi2, counts.tolist(), expected.tolist())


def test_kept_set_is_exact_on_a_large_vocabulary():
    """Sampler token == the race over the reference's kept set with the same noise, for many
    parameter mixes in one batch, with few candidates (exact rerun) and many."""
    torch.manual_seed(0)
    vocab, n = 3000, 48
    logits = torch.randn(n, vocab) * torch.linspace(0.5, 6, n)[:, None]
    logits[5, :40] = 3.0  # ties at the top-k / top-p boundary
    params = [SamplingParams(temperature=[0.5, 1.0, 1.7][i % 3],
                             top_k=[-1, 1, 7, 12, 2999][i % 5],
                             top_p=[1.0, 0.3, 0.9, 0.999][i % 4],
                             min_p=[0.0, 0.0, 0.01, 0.3][i % 4 - 1])
              for i in range(n)]
    fallbacks = []
    for candidates, with_wide_top_k in ((16, False), (1024, False), (16, True)):
        params = [p if with_wide_top_k or p.top_k != 2999 else SamplingParams(
            temperature=p.temperature, top_p=p.top_p, min_p=p.min_p) for p in params]
        seqs = [_seq(i, p, seed=7 * i, step=i % 3) for i, p in enumerate(params)]
        sampler = Sampler(candidates=candidates)
        got = _draw(sampler, logits, seqs)
        keys = torch.tensor([ops.row_key(7 * i, i % 3) for i in range(n)])
        noise = ops.log_exponential(keys[:, None], ops.token_terms(torch.arange(vocab))[None])
        for i, p in enumerate(params):
            kept = reference_probs(logits[i], p) > 0
            score = (logits[i] / p.temperature - noise[i]).masked_fill(~kept, float("-inf"))
            assert got[i] == int(score.argmax()), (i, p)
        fallbacks.append(sampler.num_fallback_rows)
    assert fallbacks[0] > fallbacks[1]  # 16 candidates: the exact rerun did real work


def test_greedy_rows_are_the_exact_argmax_including_ties():
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    logits[2, [3, 17, 40]] = 9.0  # ties: torch.argmax picks the first
    logits[4] = 0.0
    seqs = [_seq(i, SamplingParams(temperature=0 if i % 2 == 0 else 1.0)) for i in range(6)]
    got = _draw(Sampler(), logits, seqs)
    assert got[0::2] == logits.argmax(dim=-1)[0::2].tolist()
    assert got[2] == 3 and got[4] == 0


@pytest.mark.parametrize("block", [1024, 64])
def test_seeded_rows_do_not_depend_on_the_batch(block):
    """Same seed, step and logits -> same token at any row, batch size, neighbours, and
    candidate count forced by a neighbour's top_k."""
    torch.manual_seed(2)
    vocab = 500
    row = torch.randn(vocab) * 2
    mine = [SamplingParams(temperature=0.8), SamplingParams(temperature=1.0, top_p=0.9),
            SamplingParams(temperature=1.1, top_k=20, min_p=0.02)]
    alone = [_draw(Sampler(block=block), row[None], [_seq(0, p, seed=42, step=3)])[0]
             for p in mine]
    for size, pos, mates in [(2, 1, SamplingParams(temperature=0)), (9, 4, SamplingParams(
            top_k=400)), (33, 32, SamplingParams(top_p=0.5, min_p=0.5)), (5, 0, SamplingParams())]:
        for p, want in zip(mine, alone):
            logits = torch.randn(size, vocab) * 3
            logits[pos] = row
            seqs = [_seq(i, mates, seed=i, step=i) for i in range(size)]
            seqs[pos] = _seq(pos, p, seed=42, step=3)
            assert _draw(Sampler(seed=size, block=block), logits, seqs)[pos] == want
    # and a different step or seed draws afresh
    draws = {_draw(Sampler(), row[None], [_seq(0, mine[0], seed=s, step=t)])[0]
             for s in range(6) for t in range(6)}
    assert len(draws) > 5


def test_non_finite_rows_are_reported_not_raised():
    torch.manual_seed(3)
    logits = torch.randn(8, 64)
    logits[1, 5] = float("nan")
    logits[3, :] = float("inf")
    logits[4, 9] = float("-inf")  # a -inf logit alone is a legal zero probability
    logits[6, :] = float("-inf")  # nothing finite
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=1.0),
             SamplingParams(top_p=0.5), SamplingParams(top_k=3, min_p=0.1)]
    seqs = [_seq(i, kinds[i % 4]) for i in range(8)]
    out = Sampler(candidates=4)(logits, seqs)
    assert out.finite == [True, False, True, False, True, True, False, True]
    assert all(0 <= t < 64 for t in out.token_ids)
    assert out.token_ids[4] == logits[4].argmax()  # row 4 is greedy and unaffected


def test_all_greedy_batch_runs_only_argmax(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("no sampling pass for an all-greedy batch")

    monkeypatch.setattr(ops, "race_blocks", boom)
    monkeypatch.setattr(ops, "filtered_race", boom)
    logits = torch.randn(4, 30)
    assert _draw(Sampler(), logits, [_seq(i, SamplingParams(temperature=0)) for i in range(4)]) \
        == logits.argmax(-1).tolist()


def test_noise_is_uniform_enough():
    """The 24-bit uniforms behind the race: mean, and no correlation between neighbours."""
    keys = torch.tensor([ops.row_key(i, 0) for i in range(64)])
    terms = ops.token_terms(torch.arange(4096))[None]
    u = (-ops.log_exponential(keys[:, None], terms).exp()).exp()
    assert abs(u.mean().item() - 0.5) < 2e-3
    assert abs(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1]) < 5e-3
    assert u.min() > 0 and u.max() < 1


@pytest.mark.parametrize("field,kwargs", [
    ("temperature", {"temperature": 1e-300}), ("temperature", {"temperature": 1e-3}),
    ("temperature", {"temperature": float("inf")}), ("top_p", {"top_p": 1e-300}),
    ("top_p", {"top_p": float("nan")}), ("min_p", {"min_p": 1.5}), ("min_p", {"min_p": -0.1}),
    ("top_k", {"top_k": 0}), ("top_k", {"top_k": True}), ("ignore_eos", {"ignore_eos": "no"}),
    ("max_tokens", {"max_tokens": True}), ("stop", {"stop": 5}),
    ("stop_token_ids", {"stop_token_ids": 5}), ("stop_token_ids", {"stop_token_ids": [True]}),
    ("temperature", {"temperature": True}), ("min_p", {"min_p": False}),
])
def test_sampling_params_refuse_values_the_sampler_cannot_run(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_sampling_params_accept_the_edges():
    SamplingParams(temperature=0.01, top_p=1e-6, min_p=1.0, top_k=1, stop="x")
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(temperature=0).greedy


@pytest.mark.gpu
def test_cuda_path_greedy_matches_cpu_and_draws_inside_the_kept_set():
    """CUDA samples with the fused kernel (engine/fused_sampler.py; its distribution is
    checked in test_sampling_triton.py), whose noise differs from the CPU path's: greedy
    rows are identical to CPU, every sampled token lies in its row's kept set, and a seeded
    row draws the same token when the batch around it changes."""
    torch.manual_seed(4)
    logits = torch.randn(64, 32000) * 4
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=1.0),
             SamplingParams(top_k=50), SamplingParams(top_p=0.9), SamplingParams(min_p=0.05)]
    seqs = [_seq(i, kinds[i % 5], seed=i, step=i) for i in range(64)]
    cpu = _draw(Sampler(), logits, seqs)
    gpu = _draw(Sampler(), logits.cuda(), seqs)
    assert cpu[0::5] == gpu[0::5]
    for i in range(2, 64, 5):
        assert gpu[i] in torch.topk(logits[i], 50).indices.tolist()
    for i in range(3, 64, 5):
        p = torch.softmax(logits[i].double(), 0)
        assert float(p[p > p[gpu[i]]].sum()) < 0.9
    for i in range(4, 64, 5):
        p = torch.softmax(logits[i].double(), 0)
        assert float(p[gpu[i]]) >= 0.05 * float(p.max())
    alone = _draw(Sampler(), logits[7:9].cuda(), seqs[7:9])
    assert alone == gpu[7:9]


def test_host_and_tensor_mix64_agree_and_the_last_round_keeps_the_top_bits():
    xs = [0, 1, 2**63 - 1, -(2**63), -1, 0x123456789ABCDEF, -987654321987654321]
    full = ops.mix64(torch.tensor(xs))
    host = [ops._mix64_int(x % (1 << 64)) for x in xs]
    assert [v % (1 << 64) for v in full.tolist()] == host
    top = ops.mix64(torch.tensor(xs), top_bits_only=True)
    assert ((top >> 33) == (full >> 33)).all()  # bits 33..63; the noise uses 40..63
