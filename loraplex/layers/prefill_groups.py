"""How a prefill step's sequences are batched into causal attention calls.

One attention call per sequence pays the kernel's fixed cost B times and runs small tiles, so
sequences of similar length share a call: for 8-16 prompts of 128 tokens, one call per
prompt takes 1.06-1.13x as long per layer (``benchmarks/bench_cpu_parts.py`` (a)). Each is
right-padded to the group's longest: with a causal mask a real query only sees keys at or
before it, all real, so padding changes no real output and needs no mask. Padded query rows
are computed and dropped; a group is closed before that waste exceeds ``MAX_WASTE`` of its
useful work (causal cost grows with n^2).

The plan depends only on the sequence lengths, so it is built once per step (not per layer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_WASTE = 1.25  # padded attention work / real attention work a group may reach


@dataclass(frozen=True)
class PrefillGroup:
    """``size`` sequences attended as one [size, heads, length, d] call.

    Contiguous (``gather`` is None): the sequences all have ``length`` tokens and lie back to
    back from token ``start``, so the call reads views. Padded: ``gather`` [size * length]
    lists the token behind each padded row (a pad repeats its sequence's last token);
    ``rows`` [m] are the padded rows that are real and ``dest`` [m] their tokens.
    """

    size: int
    length: int
    start: int = 0
    gather: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    dest: torch.Tensor | None = None

    @property
    def covers(self) -> int:
        """Tokens this group writes when contiguous."""
        return self.size * self.length


def _group_by_length(lengths: list[int], max_waste: float) -> list[list[int]]:
    """Sequence indices grouped longest first; a group takes the next (shorter) sequence while
    size * longest^2 <= max_waste * sum(n^2). Equal lengths always share a group."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    longest = work = 0
    for i in order:
        n = lengths[i]
        if groups and (len(groups[-1]) + 1) * longest**2 <= max_waste * (work + n * n):
            groups[-1].append(i)
            work += n * n
        else:
            groups.append([i])
            longest, work = n, n * n
    return groups


def plan_prefill(
    cu_seqlens: list[int], device: torch.device, max_waste: float = MAX_WASTE
) -> list[PrefillGroup]:
    """Attention calls for sequences delimited by ``cu_seqlens`` (host list, len B + 1)."""
    lengths = [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    return plan_prefill_rows(cu_seqlens[:-1], lengths, device, max_waste)


def plan_prefill_rows(
    starts: list[int], lengths: list[int], device: torch.device, max_waste: float = MAX_WASTE
) -> list[PrefillGroup]:
    """Attention calls for sequences at token ``starts[i]`` of ``lengths[i]`` tokens each:
    some of a step's rows (in a mixed step, those with no cached prefix); the groups write
    only those rows' tokens."""
    plan = []
    for members in _group_by_length(lengths, max_waste):
        members.sort()  # token order, so equal-length neighbours are recognised as contiguous
        n = max(lengths[i] for i in members)
        first = starts[members[0]]
        if all(lengths[i] == n and starts[i] == first + k * n for k, i in enumerate(members)):
            plan.append(PrefillGroup(len(members), n, start=first))
            continue
        gather: list[int] = []
        rows: list[int] = []
        dest: list[int] = []
        for k, i in enumerate(members):
            s, m = starts[i], lengths[i]
            gather += range(s, s + m)
            gather += [s + m - 1] * (n - m)
            rows += range(k * n, k * n + m)
            dest += range(s, s + m)
        gather_t, rows_t, dest_t = (torch.tensor(v, dtype=torch.int64, device=device)
                                    for v in (gather, rows, dest))
        plan.append(PrefillGroup(len(members), n, gather=gather_t, rows=rows_t, dest=dest_t))
    return plan
