"""Random LoRA op inputs and a naive float64 per-token oracle, shared by the op tests and the
op benchmark. Unused rank rows/columns of the pool and the "never read" parts of ``h`` are
poisoned with NaN, so any kernel that reads them fails loudly."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from loraplex.ops.lora_meta import LoRABatch

PATTERNS = ("distinct", "same", "zipf", "some_none")


@dataclass
class LoRACase:
    x: torch.Tensor  # [T, in]
    a: torch.Tensor  # [S, n*R, in], rows past each rank are NaN (float) poison
    b: torch.Tensor  # [S, out, R], columns past each rank are NaN poison
    ranks: torch.Tensor  # [S, n] int32
    scalings: torch.Tensor  # [S, n] float32
    offsets: tuple[int, ...]  # n + 1 output column offsets
    token_lora_slots: list[int]  # [T], -1 = no adapter
    batch: LoRABatch

    @property
    def max_rank(self) -> int:
        return self.b.shape[2]


def token_slots_for(pattern: str, num_tokens: int, num_slots: int, rng: random.Random) -> list[int]:
    """Per-token slots: "distinct" (round-robin over slots, unsorted), "same" (one adapter),
    "zipf" (skewed, sorted into segments), "some_none" (a mix incl. -1 tokens, unsorted)."""
    if pattern == "distinct":
        return [i % num_slots for i in range(num_tokens)]
    if pattern == "same":
        return [rng.randrange(num_slots)] * num_tokens
    if pattern == "zipf":
        weights = [1.0 / (k + 1) ** 1.2 for k in range(num_slots)]
        return sorted(rng.choices(range(num_slots), weights=weights, k=num_tokens))
    if pattern == "some_none":
        return [rng.choice([-1, -1, *range(num_slots)]) for _ in range(num_tokens)]
    raise ValueError(f"unknown pattern {pattern!r}")


def make_case(
    *,
    num_tokens: int,
    in_features: int,
    widths: tuple[int, ...],
    max_rank: int,
    slot_ranks: list[list[int]],
    pattern: str | list[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
    extra_rows: int = 0,
) -> LoRACase:
    """Random inputs for ``n = len(widths)`` stacked slices; ``slot_ranks[s][i]`` is slot s's
    rank on slice i (0 = not targeted). ``x`` gets ``extra_rows`` rows past the batch."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    n, num_slots, big_r = len(widths), len(slot_ranks), max_rank
    out = sum(widths)
    offsets = tuple(sum(widths[:i]) for i in range(n + 1))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32)

    a = randn(num_slots, n * big_r, in_features) / in_features**0.5
    b = torch.zeros(num_slots, out, big_r)
    for s, rs in enumerate(slot_ranks):
        for i, r in enumerate(rs):
            a[s, i * big_r + r : (i + 1) * big_r] = float("nan")
            b[s, offsets[i] : offsets[i + 1], :r] = randn(widths[i], r) / max(r, 1) ** 0.5
            b[s, offsets[i] : offsets[i + 1], r:] = float("nan")
    scalings = torch.tensor([[rng.uniform(0.25, 2.0) for _ in range(n)] for _ in range(num_slots)])
    if isinstance(pattern, str):
        slots = token_slots_for(pattern, num_tokens, num_slots, rng)
    else:
        slots = list(pattern)
    x = randn(num_tokens + extra_rows, in_features)
    return LoRACase(
        x=x.to(device, dtype), a=a.to(device, dtype), b=b.to(device, dtype),
        ranks=torch.tensor(slot_ranks, dtype=torch.int32, device=device),
        scalings=scalings.to(device), offsets=offsets, token_lora_slots=slots,
        batch=LoRABatch.from_token_slots(slots, device=device),
    )


def poisoned_h(case: LoRACase, seed: int = 1) -> torch.Tensor:
    """A valid ``h`` for ``lora_expand``: random where shrink would write, NaN elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    t, n, big_r = len(case.token_lora_slots), case.ranks.shape[1], case.max_rank
    h = torch.full((t, n * big_r), float("nan"))
    ranks = case.ranks.tolist()
    for tok, slot in enumerate(case.token_lora_slots):
        if slot >= 0:
            for i, r in enumerate(ranks[slot]):
                h[tok, i * big_r : i * big_r + r] = torch.randn(r, generator=gen)
    return h.to(case.x.device, case.x.dtype)


def naive_shrink(case: LoRACase, out: torch.Tensor) -> torch.Tensor:
    """float64 oracle, one token at a time: ``out`` with the written entries replaced."""
    ref = out.detach().cpu().double().clone()
    ranks, big_r = case.ranks.tolist(), case.max_rank
    x, a = case.x.cpu().double(), case.a.cpu().double()
    for tok, slot in enumerate(case.token_lora_slots):
        if slot < 0:
            continue
        for i, r in enumerate(ranks[slot]):
            lo = i * big_r
            ref[tok, lo : lo + r] = a[slot, lo : lo + r] @ x[tok]
    return ref


def naive_expand(case: LoRACase, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """float64 oracle, one token at a time: ``y`` plus every token's LoRA delta."""
    ref = y.detach().cpu().double().clone()
    ranks, big_r, offs = case.ranks.tolist(), case.max_rank, case.offsets
    h64, b = h.cpu().double(), case.b.cpu().double()
    scalings = case.scalings.tolist()
    for tok, slot in enumerate(case.token_lora_slots):
        if slot < 0:
            continue
        for i, r in enumerate(ranks[slot]):
            if r == 0:
                continue
            hv = h64[tok, i * big_r : i * big_r + r]
            bs = b[slot, offs[i] : offs[i + 1], :r]
            ref[tok, offs[i] : offs[i + 1]] += scalings[slot][i] * (bs @ hv)
    return ref


def written_mask(case: LoRACase) -> torch.Tensor:
    """[T, n*R] bool: the entries of ``out`` that ``lora_shrink`` must write."""
    t, n, big_r = len(case.token_lora_slots), case.ranks.shape[1], case.max_rank
    mask = torch.zeros(t, n * big_r, dtype=torch.bool)
    ranks = case.ranks.tolist()
    for tok, slot in enumerate(case.token_lora_slots):
        if slot >= 0:
            for i, r in enumerate(ranks[slot]):
                mask[tok, i * big_r : i * big_r + r] = True
    return mask


def touched_rows(case: LoRACase) -> torch.Tensor:
    """[T] bool: tokens that use an adapter (rows ``lora_expand`` may change)."""
    return torch.tensor([s >= 0 for s in case.token_lora_slots], dtype=torch.bool)


# ---- sweep helpers shared by tests/test_lora_ops.py and tests/test_lora_triton.py

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


def build(n: int, num_tokens: int, pattern: str | list[int], max_rank: int, seed: int,
          dtype: torch.dtype = torch.float32, device: str = "cpu", in_features: int = IN_FEATURES,
          widths: tuple[int, ...] | None = None, num_slots: int = 6) -> LoRACase:
    """A random case with ``random_ranks`` (widths default to ``WIDTHS[n]``)."""
    rng = random.Random(seed)
    return make_case(
        num_tokens=num_tokens, in_features=in_features, widths=widths or WIDTHS[n],
        max_rank=max_rank, slot_ranks=random_ranks(num_slots, n, max_rank, rng),
        pattern=pattern, dtype=dtype, device=device, seed=seed, extra_rows=2,
    )


def check_shrink(shrink, case: LoRACase, rtol: float, atol: float) -> None:
    """Run ``shrink`` on a random ``out``: written entries match the oracle, others unchanged."""
    t, cols = len(case.token_lora_slots), case.a.shape[1]
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
    """Run ``expand`` on a random ``y`` and NaN-poisoned ``h``: rows with an adapter match the
    oracle, rows without one are bit-identical, and no poison leaks in."""
    t, out_features = len(case.token_lora_slots), case.b.shape[1]
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


def check_declines_when_disabled(monkeypatch, run) -> None:
    """A fused C op's ``run()`` returns None (the caller's unfused path) with
    ``LORAPLEX_FUSED_ELEMENTWISE=0`` and, where the C library loads, with its AVX-512 code
    switched off (what a CPU without it gets). ``monkeypatch``: pytest's fixture."""
    from loraplex.ops import lora_cpu

    monkeypatch.setenv("LORAPLEX_FUSED_ELEMENTWISE", "0")
    assert run() is None
    monkeypatch.delenv("LORAPLEX_FUSED_ELEMENTWISE")
    if not isinstance(lora_cpu._native(), str):
        monkeypatch.setattr(lora_cpu._native(), "simd", 0)
        assert run() is None
