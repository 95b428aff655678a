"""Fused GPU sampling: temperature, top-k, top-p and min-p for a whole batch in one launch.

Semantics as PyTorch code, per sampled row (``temperature[i] > 0``; other rows keep
``out[i]``)::

    s = logits[i].float() / temperature[i]
    keep = logits[i] >= kth[i]                      # top-k (kth = -inf: off); ties kept
    p = softmax(s.masked_fill(~keep, -inf))         # top-p runs on the top-k distribution
    above = [p[p > p[j]].sum() for j in range(V)]   # mass strictly more likely than j
    keep &= above < top_p[i]                        # smallest top set reaching top_p
    keep &= p >= min_p[i] * p.max()                 # min-p, relative to the best token
    out[i] = torch.multinomial(p * keep, 1)

How: one program per row streams the row (it stays in L2 between passes). Pass 1 finds the
row's max and the softmax normalisers of the whole row and of its top-k set. Then rounds of
rejection sampling with a pivot: a Gumbel-max race (``argmax(s + Gumbel)``, noise from
``tl.rand``, Philox keyed on the row's ``key`` and counted by ``round * V + token``) draws a
candidate from ``p`` restricted to the top-k/min-p set above the pivot; one more pass sums
the mass above it. If that mass reaches ``top_p`` the candidate is outside the nucleus, and
so is every token at most as likely: the pivot moves up to it and the race runs again.
Drawing from ``p`` conditioned on a superset of the kept set and accepting only kept tokens
gives ``p`` conditioned on the kept set, i.e. exactly the distribution above. Rows without
top-p accept the first candidate (two passes in all). The most likely token is always kept,
so the loop ends; after ``MAX_ROUNDS`` rounds (a probability far below anything a test can
see) a row takes its most likely token.

A row's draw depends on its key, its logits and its parameters only: not on the batch size,
the row's position or its neighbours.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROUNDS = 48


@triton.jit
def _sample_kernel(
    logits_ptr, stride, V, temp_ptr, top_p_ptr, min_p_ptr, kth_ptr, key_ptr, out_ptr,
    BLOCK: tl.constexpr, MAX_ROUNDS: tl.constexpr,
):
    row = tl.program_id(0)
    temp = tl.load(temp_ptr + row)
    if temp > 0:
        base = logits_ptr + row.to(tl.int64) * stride
        inv_t = 1.0 / temp
        top_p = tl.load(top_p_ptr + row)
        log_min_p = tl.log(tl.load(min_p_ptr + row))  # -inf when min-p is off
        kth = tl.load(kth_ptr + row)
        key = tl.load(key_ptr + row)
        offs = tl.arange(0, BLOCK)
        # pass 1: max of s, and sum(exp(s - max)) over the row and over its top-k set
        m = float("-inf")
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf"))
            m = tl.maximum(m, tl.max(x.to(tl.float32) * inv_t, axis=0))
        zk = 0.0
        for start in range(0, V, BLOCK):
            x = tl.load(base + start + offs, mask=start + offs < V, other=float("-inf"))
            x = x.to(tl.float32)
            e = tl.exp(x * inv_t - m)
            zk += tl.sum(tl.where(x >= kth, e, 0.0), axis=0)
        # candidates: top-k set, p / p_max >= min_p, strictly above the pivot
        floor = m + log_min_p
        pivot = float("-inf")
        best_idx = 0
        done = 0
        rnd = 0
        while (done == 0) & (rnd < MAX_ROUNDS):
            best_g = float("-inf")
            best_idx = -1
            best_s = float("-inf")
            for start in range(0, V, BLOCK):
                idx = start + offs
                x = tl.load(base + idx, mask=idx < V, other=float("-inf")).to(tl.float32)
                s = x * inv_t
                ok = (idx < V) & (x >= kth) & (s >= floor) & (s > pivot)
                u = tl.rand(key, rnd * V + idx)
                g = s - tl.log(-tl.log(tl.maximum(u, 1e-20)))
                g = tl.where(ok, g, float("-inf"))
                bg = tl.max(g, axis=0)
                bi = tl.argmax(g, axis=0)
                take = bg > best_g
                best_g = tl.where(take, bg, best_g)
                best_idx = tl.where(take, start + bi, best_idx)
                best_s = tl.where(take, tl.max(tl.where(idx == start + bi, s, float("-inf")),
                                               axis=0), best_s)
            if best_idx < 0:  # nothing above the pivot: cannot happen (the max is kept)
                done = 1
            elif top_p >= 1.0:
                done = 2
            else:
                above = 0.0
                for start in range(0, V, BLOCK):
                    x = tl.load(base + start + offs, mask=start + offs < V,
                                other=float("-inf")).to(tl.float32)
                    s = x * inv_t
                    above += tl.sum(tl.where(s > best_s, tl.exp(s - m), 0.0), axis=0)
                if above < top_p * zk:
                    done = 2
                else:
                    pivot = best_s
            rnd += 1
        if done == 2:
            tl.store(out_ptr + row, best_idx.to(tl.int64))


def fused_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    kth: torch.Tensor,
    key: torch.Tensor,
    out: torch.Tensor,
    block: int = 2048,
) -> None:
    """Sample one token per row with ``temperature > 0`` into ``out`` (see the module
    docstring). ``logits [B, V]`` float32/16 (rows contiguous); ``temperature``, ``top_p``,
    ``min_p`` (0 = off), ``kth`` (the top-k threshold logit, -inf = off) ``[B]`` float32;
    ``key [B]`` int64 (the row's noise stream); ``out [B]`` int64 holds the greedy rows'
    tokens (and a fallback for the rest) and is overwritten for sampled rows. Rows whose
    loop ran out keep ``out`` (pass their argmax). No allocation, no host sync."""
    B, V = logits.shape
    assert logits.stride(1) == 1 and out.dtype == torch.int64 and key.dtype == torch.int64
    for t in (temperature, top_p, min_p, kth):
        assert t.dtype == torch.float32 and t.shape == (B,) and t.is_contiguous()
    block = min(block, triton.next_power_of_2(V))
    _sample_kernel[(B,)](logits, logits.stride(0), V, temperature, top_p, min_p, kth, key, out,
                         BLOCK=block, MAX_ROUNDS=MAX_ROUNDS, num_warps=8 if block >= 2048 else 4)
