"""Penalties and constraints on a step's logits, batched on their device, before sampling.

Applied in place to the rows whose ``SamplingParams.has_penalties``, in vLLM's order, before
either sampler (``sampler.py`` on CPU, ``fused_sampler.py`` on CUDA) sees the logits::

    for each row r with its params p, generated tokens out, prompt tokens prompt:
        for word in p.bad_words (tokenized):                  # ban what would complete it
            if out[len(out) - len(word) + 1:] == word[:-1]: logits[r, word[-1]] = -inf
        if len(out) < p.min_tokens:
            logits[r, eos_ids + p.stop_token_ids] = -inf
        logits[r, id] += bias  for id, bias in p.logit_bias.items()
        seen = set(prompt) | set(out)                         # repetition: transformers / vLLM
        logits[r, t] = logits[r, t] / rep if logits[r, t] > 0 else logits[r, t] * rep  (t in seen)
        logits[r, t] -= p.frequency_penalty * out.count(t) + p.presence_penalty * (t in out)

A step where no row has any of them returns the logits untouched, decided on the host from
the params alone. Token counts for repetition / frequency / presence live on the device in a
table with one row per such request (``counts [rows, vocab]`` float32 of generated tokens, and
``prompt_seen [rows, vocab]`` bool), filled by one scatter of the prompt at the request's
first step and updated by one scatter of the sampled tokens per step (``record``), never
rebuilt from the token lists. A request keeps its row across preemption; rows of finished
requests are reclaimed when the table needs room.
"""

from __future__ import annotations

import torch

from loraplex.engine.sequence import Sequence


def _counts_tokens(seq: Sequence) -> bool:
    p = seq.params
    return bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1)


class Penalties:
    """``penalties(logits [B, vocab], seqs) -> logits`` (in place) and
    ``penalties.record(seqs, tokens)`` after sampling; see the module docstring."""

    def __init__(self, eos_ids: list[int] | tuple[int, ...] = (), capacity: int = 8) -> None:
        self.eos_ids = list(eos_ids)
        self.capacity = capacity
        self.counts: torch.Tensor | None = None  # [capacity, vocab] int32
        self.prompt_seen: torch.Tensor | None = None  # [capacity, vocab] bool
        self._slot: dict[int, tuple[Sequence, int]] = {}  # seq_id -> (seq, table row)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        rows = [i for i, s in enumerate(seqs) if s.params.has_penalties]
        if not rows:
            return logits  # nothing on: today's code, no device work
        self._masks_and_bias(logits, [seqs[i] for i in rows], rows)
        counted = [i for i in rows if _counts_tokens(seqs[i])]
        if counted:
            self._repetition_frequency_presence(logits, seqs, counted)
        return logits

    def record(self, seqs: list[Sequence], tokens: list[int]) -> None:
        """Count each row's sampled token (one scatter for the whole step)."""
        pairs = [(self._slot[s.seq_id][1], t) for s, t in zip(seqs, tokens)
                 if s.seq_id in self._slot]
        if not pairs:
            return
        idx = torch.tensor(pairs, device=self.counts.device).T
        self.counts.index_put_((idx[0], idx[1]), self._one, accumulate=True)

    # -- stages --------------------------------------------------------------------------------
    def _masks_and_bias(self, logits: torch.Tensor, seqs: list[Sequence],
                        rows: list[int]) -> None:
        ban_r: list[int] = []
        ban_t: list[int] = []
        bias_r: list[int] = []
        bias_t: list[int] = []
        bias_v: list[float] = []
        for r, seq in zip(rows, seqs):
            p, out = seq.params, seq.output_token_ids
            for word in seq.bad_words_ids:
                # a few host compares of the output's tail: no O(context) work
                if len(word) == 1 or out[len(out) - len(word) + 1 :] == word[:-1]:
                    ban_r.append(r)
                    ban_t.append(word[-1])
            if len(out) < p.min_tokens:
                stops = self.eos_ids + p.stop_token_ids
                ban_r += [r] * len(stops)
                ban_t += stops
            if p.logit_bias:
                bias_r += [r] * len(p.logit_bias)
                bias_t += p.logit_bias.keys()
                bias_v += p.logit_bias.values()
        dev = logits.device
        if ban_r:
            logits[torch.tensor(ban_r, device=dev), torch.tensor(ban_t, device=dev)] = float(
                "-inf")
        if bias_r:
            # bias ids were checked against the vocabulary at admission
            logits.index_put_((torch.tensor(bias_r, device=dev), torch.tensor(bias_t, device=dev)),
                              torch.tensor(bias_v, device=dev, dtype=logits.dtype),
                              accumulate=True)

    def _repetition_frequency_presence(self, logits: torch.Tensor, seqs: list[Sequence],
                                       rows: list[int]) -> None:
        dev = logits.device
        slots = [self._table_row(seqs[i], logits.shape[1], dev) for i in rows]
        params = [seqs[i].params for i in rows]
        floats = torch.tensor([[p.repetition_penalty for p in params],
                               [p.frequency_penalty for p in params],
                               [p.presence_penalty for p in params]], device=dev,
                              dtype=logits.dtype)
        ints = torch.tensor([rows, slots], device=dev)
        rep, freq, pres = (floats[j][:, None] for j in range(3))
        counts = self.counts[ints[1]].to(logits.dtype)  # [R, vocab], a gathered copy
        whole = rows == list(range(logits.shape[0]))  # then work on the logits in place
        x = logits if whole else logits[ints[0]]
        if any(p.repetition_penalty != 1 for p in params):
            seen = self.prompt_seen[ints[1]] | (counts > 0)
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        # x is the logits themselves or a temporary of ours: in place either way
        if any(p.frequency_penalty for p in params):
            x.addcmul_(counts, freq, value=-1)
        if any(p.presence_penalty for p in params):
            x.addcmul_(counts.clamp_(max=1), pres, value=-1)  # counts is a gathered copy
        if x is not logits:
            logits[ints[0]] = x

    # -- the count table -----------------------------------------------------------------------
    def _table_row(self, seq: Sequence, vocab: int, device: torch.device) -> int:
        hit = self._slot.get(seq.seq_id)
        if hit is not None:
            return hit[1]
        if self.counts is None or self.counts.device != device:
            # float32: counts stay exact below 2^24 and need no conversion in the penalty math
            self.counts = torch.zeros(self.capacity, vocab, dtype=torch.float32, device=device)
            self.prompt_seen = torch.zeros(self.capacity, vocab, dtype=torch.bool, device=device)
            self._one = torch.ones((), dtype=torch.float32, device=device)
        free = sorted(set(range(self.capacity)) - {r for _, r in self._slot.values()})
        if not free:
            self._slot = {k: v for k, v in self._slot.items() if not v[0].finished}
            free = sorted(set(range(self.capacity)) - {r for _, r in self._slot.values()})
        if not free:
            self._grow()
            return self._table_row(seq, vocab, device)
        row = free[0]
        self._slot[seq.seq_id] = (seq, row)
        self.counts[row].zero_()
        self.prompt_seen[row].zero_()
        if seq.params.repetition_penalty != 1:  # one scatter of the prompt, once per request
            self.prompt_seen[row, torch.tensor(seq.prompt_token_ids, device=device)] = True
        if seq.output_token_ids:  # (a request never seen before has none; kept for safety)
            out = torch.tensor(seq.output_token_ids, device=device)
            self.counts[row].index_add_(0, out, torch.ones_like(out, dtype=torch.float32))
        return row

    def _grow(self) -> None:
        old_c, old_p = self.counts, self.prompt_seen
        self.capacity *= 2
        self.counts = torch.zeros(self.capacity, old_c.shape[1], dtype=old_c.dtype,
                                  device=old_c.device)
        self.prompt_seen = torch.zeros_like(self.counts, dtype=torch.bool)
        self.counts[: len(old_c)] = old_c
        self.prompt_seen[: len(old_p)] = old_p
