"""Logprobs of generated and prompt tokens, for a whole batch in tensor ops on the device.

Definition (vLLM V1's default, ``logprobs_mode="raw_logprobs"``): **raw** logprobs,
``log_softmax`` of the model's logits in float32, before penalties, ``logit_bias``,
``min_tokens``, temperature and top-k/top-p/min-p::

    lp = torch.log_softmax(logits.float(), dim=-1)         # logits: [rows, vocab]
    logprob = lp[r, token]                                 # the chosen (or prompt) token
    rank = 1 + (lp[r] > lp[r, token]).sum()                # 1 = nothing is more likely
    top = lp[r].topk(k)                                    # (id, logprob), best first

(vLLM counts tied tokens into the rank, ``(lp[r] >= lp[r, token]).sum()``; here ties share
the better rank, so a greedy row without penalties has rank 1 without a pass over its row.)

Why raw rather than "after temperature": a logprob then means one thing for every request,
whatever its sampling settings; for temperature 1 or greedy the two coincide; it is what
scoring harnesses need (``echo`` + ``logprobs`` + ``max_tokens: 0`` scores text under the
model, not under a request's penalties); and it equals ``log_softmax(LLM.score())`` exactly,
which is how it is tested. ``cumulative_logprob`` (the ranking key of ``best_of``) sums the
same values.

Rows that asked for nothing cost nothing: ``SampleLogprobs.start`` returns None when no row
of the step asked, and the runner then runs exactly the code it ran before logprobs existed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from loraplex.engine.sequence import Sequence

# Prompt positions per log_softmax pass: bounds the [rows, vocab] float32 temporaries
# (512 x 128256 x 4 B = 256 MiB) for long prompts.
_PROMPT_ROWS_PER_PASS = 512


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]]  # the k most likely (token id, logprob), best first


def _measure(lp: torch.Tensor, tokens: torch.Tensor, kmax: int,
             argmax: bool = False) -> torch.Tensor:
    """``[rows, 2 + 2 * kmax]`` float64: chosen logprob, rank, top ids, top logprobs.
    ``lp``: [rows, vocab] log-probabilities; ``tokens``: [rows] int64 on lp's device;
    ``argmax``: every token is its row's argmax (rank 1, no pass over the rows)."""
    chosen = lp.gather(1, tokens[:, None])  # [rows, 1]
    rank = (torch.ones_like(chosen) if argmax
            else 1 + (lp > chosen).sum(dim=1, keepdim=True))
    parts = [chosen.double(), rank.double()]
    if kmax:
        top = lp.topk(kmax, dim=1)
        parts += [top.indices.double(), top.values.double()]  # ids < 2^53: exact in float64
    return torch.cat(parts, dim=1)


def _unpack(row: list[float], token: int, k: int, kmax: int) -> TokenLogprobs:
    ids, vals = row[2 : 2 + kmax], row[2 + kmax :]
    return TokenLogprobs(token, row[0], int(row[1]),
                         [(int(ids[j]), vals[j]) for j in range(k)])


class SampleLogprobs:
    """Logprobs of one step's sampled tokens, in two halves around the sampler:
    ``start(logits, seqs)`` before any logits processing (raw logits), ``finish(tokens)``
    once the tokens are known, with one device -> host copy for all the rows that asked."""

    def __init__(self, logits: torch.Tensor, rows: list[int], ks: list[int],
                 argmax: bool = False) -> None:
        self.rows, self.ks, self.kmax, self.argmax = rows, ks, max(ks), argmax
        picked = logits if len(rows) == logits.shape[0] else logits[
            torch.tensor(rows, device=logits.device)]
        self.lp = torch.log_softmax(picked.float(), dim=-1)  # [rows, vocab], a new tensor

    @classmethod
    def start(cls, logits: torch.Tensor, seqs: list[Sequence]) -> SampleLogprobs | None:
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if not rows:
            return None
        # greedy rows with no penalties take the argmax of these very logits
        argmax = all(seqs[i].params.greedy and not seqs[i].params.has_penalties for i in rows)
        return cls(logits, rows, [seqs[i].params.logprobs for i in rows], argmax)

    def finish(self, tokens: list[int]) -> list[TokenLogprobs | None]:
        """One entry per batch row: None where the row did not ask."""
        chosen = torch.tensor([tokens[i] for i in self.rows], device=self.lp.device)
        host = _measure(self.lp, chosen, self.kmax, self.argmax).tolist()  # the one copy
        out: list[TokenLogprobs | None] = [None] * len(tokens)
        for i, k, row in zip(self.rows, self.ks, host):
            out[i] = _unpack(row, tokens[i], k, self.kmax)
        return out


def record_sample_logprob(seq: Sequence, entry: TokenLogprobs | None) -> None:
    """Append a generated token's logprob to its sequence (after the token itself)."""
    if entry is not None and seq.logprobs is not None:
        seq.logprobs.append(entry)
        seq.cumulative_logprob += entry.logprob


def record_prompt_logprobs(compute_logits, hidden: torch.Tensor, seqs: list[Sequence],
                           row_starts: list[int], first_positions: list[int],
                           lengths: list[int], lora_slots: list[int]) -> None:
    """Extend ``seq.prompt_logprobs`` for every sequence in a prefill that still wants them.

    Sequence ``i``'s chunk holds positions ``first_positions[i] + j`` for ``j < lengths[i]`` at
    ``hidden[row_starts[i] + j]``; the logits at position ``p`` give the logprob of prompt
    token ``p + 1``. Chunks must arrive in order from position 0 (a prompt served from the
    prefix cache has no logits to give: the scheduler keeps such requests off the cache).
    A recomputed prefill (after preemption) adds nothing once the list is complete.
    ``compute_logits(h, row_slots)``: hidden [n, hidden] and each row's lora slot (sequence
    ``i``'s rows are on ``lora_slots[i]``, -1 = none) -> logits [n, vocab].
    """
    rows: list[int] = []  # hidden rows, in target order
    row_slots: list[int] = []  # their lora slots
    targets: list[int] = []  # the prompt token each row's logits score
    owners: list[tuple[Sequence, int]] = []  # (seq, number of targets), in order
    for seq, start, pos0, n, slot in zip(seqs, row_starts, first_positions, lengths, lora_slots):
        if not seq.wants_prompt_logprobs:
            continue
        have = len(seq.prompt_logprobs)
        assert have >= pos0, (f"prompt logprobs of request {seq.request_id!r} need logits at "
                              f"positions {have}..{pos0 - 1}, which this prefill skipped")
        if have == 0:
            seq.prompt_logprobs.append(None)  # nothing predicts the first prompt token
            have = 1
        first, last = max(have, pos0 + 1), min(pos0 + n, len(seq.prompt_token_ids) - 1)
        if first > last:
            continue
        rows += range(start + first - 1 - pos0, start + last - pos0)
        row_slots += [slot] * (last - first + 1)
        targets += seq.prompt_token_ids[first : last + 1]
        owners.append((seq, last - first + 1))
    if not rows:
        return
    kmax = max(s.params.prompt_logprobs for s, _ in owners)
    dev = hidden.device
    rows_t = torch.tensor(rows, device=dev)
    targets_t = torch.tensor(targets, device=dev)
    parts = []
    for a in range(0, len(rows), _PROMPT_ROWS_PER_PASS):
        b = a + _PROMPT_ROWS_PER_PASS
        logits = compute_logits(hidden[rows_t[a:b]], row_slots[a:b])
        lp = torch.log_softmax(logits.float(), dim=-1)
        parts.append(_measure(lp, targets_t[a:b], kmax))
    host = torch.cat(parts).tolist()  # one copy back for the whole prefill
    at = 0
    for seq, count in owners:
        k = seq.params.prompt_logprobs
        for row, tok in zip(host[at : at + count], targets[at : at + count]):
            seq.prompt_logprobs.append(_unpack(row, tok, k, kmax))
        at += count
