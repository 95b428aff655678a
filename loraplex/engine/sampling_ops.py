"""Batched sampling ops: counter-based noise, the exponential race, top-k / top-p / min-p.

Rows draw with the exponential race (the Gumbel-max trick): token ``j`` of row ``i`` gets
``E_ij ~ Exp(1)`` and the row picks ``argmax_j (s_ij - log E_ij)`` over its kept tokens,
where ``s = logits / temperature``; ``P(j wins) = softmax(s over kept)_j`` exactly. Rows with
no filter race first over blocks of the vocabulary, then within the chosen block
(``race_blocks``), so only two small sets of noise are drawn.

``E_ij`` comes from a counter-based generator: a splitmix64 stream keyed by the row's
``(seed, step)`` (``row_key``, on the host) and indexed by the token id (int64 tensor ops
on the device; ``step`` = tokens the request generated so far). So a row's
draw depends on its seed, its step and its logits only: not on the batch size, the row's
position, its neighbours, or on how many candidates a pass looked at (a token's noise is
the same whether the candidate pass or the full-vocabulary pass scores it, so both passes
pick the same token whenever the candidates hold the whole kept set).
"""

from __future__ import annotations

import torch


def _signed(c: int) -> int:
    return c - (1 << 64) if c >= 1 << 63 else c


GOLDEN = _signed(0x9E3779B97F4A7C15)  # splitmix64's stream increment
_MUL1 = _signed(0xBF58476D1CE4E5B9)
_MUL2 = _signed(0x94D049BB133111EB)
_BLOCK_STREAM = 0x5DEECE66D  # separates the block races' stream from the tokens'


def mix64(x: torch.Tensor, top_bits_only: bool = False) -> torch.Tensor:
    """splitmix64's finalizer, in place on an int64 tensor (arithmetic mod 2**64).

    Semantics: ``x ^= x >>> 30; x *= 0xBF58476D1CE4E5B9; x ^= x >>> 27;
    x *= 0x94D049BB133111EB; x ^= x >>> 31`` with ``>>>`` a logical shift (torch's ``>>``
    is arithmetic on int64, so the sign-extended bits are masked off). The last xorshift
    leaves bits 33..63 as they are: ``top_bits_only`` skips it (3 kernels fewer).
    """
    tmp = torch.empty_like(x)
    rounds = ((30, _MUL1), (27, _MUL2)) if top_bits_only else ((30, _MUL1), (27, _MUL2),
                                                                 (31, None))
    for shift, mul in rounds:
        torch.bitwise_right_shift(x, shift, out=tmp)
        tmp &= (1 << (64 - shift)) - 1
        x ^= tmp
        if mul is not None:
            x *= mul
    return x


def _mix64_int(x: int) -> int:
    """``mix64`` on one Python int (unsigned 64-bit in, unsigned out)."""
    m = (1 << 64) - 1
    x = ((x ^ (x >> 30)) * (_MUL1 % (1 << 64))) & m
    x = ((x ^ (x >> 27)) * (_MUL2 % (1 << 64))) & m
    return x ^ (x >> 31)


def row_key(seed: int, step: int) -> int:
    """A row's stream key (signed int64), computed on the host when the step is planned:
    ``mix64(mix64(seed + G) + (step + 1) * G)``, one independent stream per (request, step)."""
    m = (1 << 64) - 1
    g = GOLDEN % (1 << 64)
    key = _mix64_int((_mix64_int((seed + g) & m) + (step + 1) * g) & m)
    return key - (1 << 64) if key >= 1 << 63 else key


def log_exponential(keys: torch.Tensor, token_terms: torch.Tensor) -> torch.Tensor:
    """keys [n, 1] int64, token_terms [n or 1, k] int64 (``(token_id + 1) * GOLDEN``)
    -> log E [n, k] float32 with ``E = -log(u)``, ``u`` the top 24 bits of
    ``mix64(key + token_term)`` mapped to the open interval (0, 1)."""
    h = mix64(keys + token_terms, top_bits_only=True)
    h >>= 40
    h &= (1 << 24) - 1  # the top 24 bits (>> sign-extends); float32 holds them exactly
    u = h.to(torch.float32).add_(0.5).mul_(2.0**-24)
    return u.log_().neg_().log_()


def token_terms(token_ids: torch.Tensor) -> torch.Tensor:
    """token ids (any shape, int64) -> ``(token_id + 1) * GOLDEN`` (the counter of the stream)."""
    return (token_ids + 1) * GOLDEN


def race_blocks(s: torch.Tensor, keys: torch.Tensor, block: int) -> torch.Tensor:
    """Unfiltered rows, in two small races instead of noise for every token.

    s [n, W] float32 scaled logits, ``W`` a multiple of ``block`` (padding columns -inf);
    keys [n] int64 -> token ids [n]. Semantics: pick block ``b`` with probability
    ``sum_{j in b} p_j`` (a race over the blocks' log-sum-exp, noise keyed on the block
    index in a stream of its own), then token ``j`` within ``b`` with probability
    ``p_j / sum_{j in b} p_j`` (a race keyed on the token id): overall ``P(j) = p_j``.
    The full-vocabulary work is one ``logsumexp``.
    """
    n, width = s.shape
    blocks = s.view(n, width // block, block)
    lse = torch.logsumexp(blocks, dim=-1)  # [n, blocks]
    block_keys = mix64(keys ^ _BLOCK_STREAM)
    b = (lse - log_exponential(block_keys[:, None], token_terms(
        torch.arange(lse.shape[1], device=s.device))[None])).argmax(dim=-1)  # [n]
    inner = blocks[torch.arange(n, device=s.device), b]  # [n, block]
    ids = b[:, None] * block + torch.arange(block, device=s.device)
    j = (inner - log_exponential(keys[:, None], token_terms(ids))).argmax(dim=-1, keepdim=True)
    return ids.gather(1, j).squeeze(1)


def filtered_race(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    keys: torch.Tensor,
    num_candidates: int,
    need_full_mass: bool,
    uses: tuple[bool, bool, bool] = (True, True, True),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, then top-p, then min-p, then the race, over each row's best candidates.

    logits [n, V] float32; temperature [n] float32 (> 0); top_k [n] int64 (<= 0: off; when
    on, below ``num_candidates``); top_p [n] float32 (> 1, e.g. inf: off); min_p [n]
    float32; keys [n] int64; ``need_full_mass``: some row has top-p on and top-k off (its
    top-p mass is over the whole row); ``uses``: whether any row has top-k / top-p / min-p
    on (the host knows; a stage no row uses is skipped). Returns (token ids [n], covered [n]
    bool).

    Semantics, per row, with ``s = logits / temperature`` and ``p = exp(s - max s)``
    (probabilities up to one factor):
      1. top-k: keep ``s_j >= (k-th largest s)`` (ties with the k-th value are kept);
      2. top-p: with ``Z`` the kept mass and the kept tokens sorted by ``p`` descending,
         ``b`` = the first token where the running mass reaches ``top_p * Z``; keep
         ``p_j >= p_b`` (the smallest set whose mass reaches top_p, plus any token tied
         with its last member, so the set does not depend on how ties were ordered);
      3. min-p: keep ``p_j >= min_p`` (``p`` is relative to the row maximum);
      4. token = ``argmax`` over kept ``j`` of ``s_j - log E_j``.
    All of this runs on the ``num_candidates`` largest values only (dividing by a positive
    temperature keeps the order, so they are picked from the raw logits). ``covered`` is
    False when the last candidate is still kept (the kept set may go on past the
    candidates): the caller reruns such rows with more, up to ``V`` (exact).
    """
    vocab = logits.shape[1]
    vals, idx = logits.topk(num_candidates, dim=-1)  # [n, kc], sorted descending
    vals /= temperature[:, None]
    p = (vals - vals[:, :1]).exp_()
    use_k, use_p, use_min_p = uses
    keep = torch.ones_like(vals, dtype=torch.bool)
    if use_k:
        k = torch.where(top_k > 0, top_k, num_candidates).clamp_(1, num_candidates)
        keep = vals >= vals.gather(1, (k - 1)[:, None])
    if use_p:
        cum = (p * keep if use_k else p).cumsum(dim=-1)
        mass = cum[:, -1]
        if need_full_mass:
            full = (torch.logsumexp(logits / temperature[:, None], dim=-1) - vals[:, 0]).exp_()
            mass = torch.where(top_k > 0, mass, full) if use_k else full
        reach = cum >= (top_p * mass)[:, None]  # never for top_p > 1 rows
        first = reach.to(torch.uint8).argmax(dim=-1, keepdim=True)  # first True (0 if none)
        bound = torch.where(reach.any(dim=-1, keepdim=True), p.gather(1, first), 0.0)
        keep &= p >= bound
    if use_min_p:
        keep &= p >= min_p[:, None]
    score = torch.where(keep, vals - log_exponential(keys[:, None], token_terms(idx)),
                        float("-inf"))
    tokens = idx.gather(1, score.argmax(dim=-1, keepdim=True)).squeeze(1)
    covered = ~keep[:, -1] if num_candidates < vocab else torch.ones_like(keep[:, -1])
    return tokens, covered
