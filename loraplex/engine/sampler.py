"""Next-token sampling for a whole batch in tensor ops on the logits' device.

Per row, in this order (vLLM's): greedy rows (temperature 0) take the exact ``argmax`` of
the raw logits. Sampled rows: divide by the temperature -> top-k -> top-p (on the top-k
renormalized distribution) -> min-p (relative to the most likely token) -> draw with the
exponential race keyed on ``(seed, step, token id)`` (``sampling_ops``). Every request has
a seed: unseeded requests get one from the engine at creation, so all rows share one path
and a seeded request's tokens do not depend on the batch around it.

Only what some row needs runs, decided from the parameters on the host (no device sync):
an all-greedy batch is one ``argmax``; rows without top-k/top-p/min-p race over vocabulary
blocks and then within one block (one ``logsumexp`` over the vocabulary); filtered rows
race over their ``candidates`` best tokens and, in the rare case where a row's kept set
reaches past them, are rerun with 16x the candidates, then over the full vocabulary.
Per-row parameters go to the device in one copy from a reused host buffer; the sampled ids,
a finiteness flag per row and the candidate-coverage flags come back in one copy.

The logits arrive after ``penalties.py`` (bad words, min_tokens, logit_bias, repetition /
frequency / presence penalties); logprobs were taken from them before that (``logprobs.py``).

Non-finite logits (a NaN or +inf anywhere in a row, or no finite value at all) are found
from the ``argmax`` every step computes anyway (it ranks NaN above everything), so the
check costs no extra pass. Such rows are reported, never raised: the engine ends only them.

Measured on CPU (``benchmarks/bench_sampler.py --threads 1 --repeat 5``, one thread of a
shared, noisy 2-core host, batch 64, logits N(0, 4^2), 4096 candidates, median ms per step;
old = the previous per-row host loop on the same logits):

  vocab   | greedy | temperature    | top-k 50       | top-p 0.95      | min-p 0.05
  32000   | 15.3   | 44 (old 153)   | 27 (old 183)   | 120 (old 507)   | 103 (old 168)
  128256  | 53.6   | 150 (old 551)  | 109 (old 761)  | 365 (old 2112)  | 265 (old 601)

With 1024 candidates, 78% of those top-p rows at vocab 128256 kept more tokens than that
and took the rerun (952 ms per step), hence the default of 4096.

On CUDA (with triton) every sampled row goes through one fused kernel instead
(``fused_sampler.py`` / ``ops/sampling_triton.py``): the tensor ops below launch dozens of
small kernels a step, 1.5-2.3 ms on an H200 whatever the batch (``bench_sampler.py``). The
kernel keeps the same kept set and order of operations; its noise is Philox keyed on the
same row key, so CUDA draws are reproducible per seed but not equal to the CPU path's.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch

from loraplex.engine import sampling_ops as ops
from loraplex.engine.logprobs import TokenLogprobs
from loraplex.engine.sequence import Sequence


@dataclass
class SamplerOutput:
    token_ids: list[int]  # one per row (meaningless where ``finite`` is False)
    finite: list[bool]  # False: the row's logits held NaN/+inf (or nothing finite)
    # per row, the sampled token's logprobs where its request asked (None: no row asked)
    logprobs: list[TokenLogprobs | None] | None = None


@dataclass
class _Rows:
    """Host-side plan of one step's sampled rows (greedy rows need nothing)."""

    index: list[int]  # batch positions
    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    min_p: list[float]
    key: list[int]  # sampling_ops.row_key(seed, step): the row's noise stream


class Sampler:
    """``sampler(logits [B, vocab], seqs) -> SamplerOutput``; see the module docstring."""

    def __init__(self, seed: int = 0, candidates: int = 4096, block: int = 1024) -> None:
        self._rng = random.Random(seed)  # seeds for unseeded requests
        self.candidates = candidates
        self.block = block  # vocabulary block of the unfiltered rows' two-level race
        self._host: torch.Tensor | None = None  # [rows, capacity] int64, floats as f64 bits
        self._dev: torch.Tensor | None = None
        self._fused = None  # the CUDA path (fused_sampler.py), built on first use
        self.num_fallback_rows = 0  # filtered rows the first candidate pass did not settle

    def new_seed(self) -> int:
        return self._rng.getrandbits(64)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        batch, vocab = logits.shape
        ids = logits.argmax(dim=-1)  # NaN ranks first, then +inf: the finiteness check
        finite = logits.gather(1, ids[:, None]).squeeze(1).isfinite()
        fused = self._fused_path(logits.device) if logits.is_cuda else None
        if fused is not None and any(s.params.temperature > 0 for s in seqs):
            fused(logits, seqs, ids)  # every sampled row in one launch, see fused_sampler
            host = torch.cat([ids, finite.to(torch.int64)]).tolist()
            return SamplerOutput(host[:batch], [bool(v) for v in host[batch:]])
        plain, filtered = _plan(seqs, vocab)
        covered: torch.Tensor | None = None
        if plain.index or filtered.index:
            plain_t, filt_t = self._upload([plain, filtered], logits.device)
            if plain.index:
                ids.index_copy_(0, plain_t["index"], self._plain(logits, plain_t))
            if filtered.index:
                tok, covered = self._filtered(logits, filtered, filt_t, self._num_candidates(
                    filtered, vocab))
                ids.index_copy_(0, filt_t["index"], tok)
                covered |= ~finite[filt_t["index"]]  # nothing to redo for a poisoned row
        parts = [ids, finite.to(torch.int64)]
        if covered is not None:
            parts.append(covered.to(torch.int64))
        host = torch.cat(parts).tolist()  # the step's only device -> host copy
        tokens, ok = host[:batch], [bool(v) for v in host[batch : 2 * batch]]
        missed = [i for i, c in enumerate(host[2 * batch :]) if not c]
        if missed:
            self._rerun(logits, filtered, missed, tokens, self._num_candidates(filtered, vocab))
        return SamplerOutput(tokens, ok)

    def _fused_path(self, device: torch.device):
        """The CUDA path, built on first use; None (tensor ops) where triton is missing."""
        if self._fused is None:
            try:
                from loraplex.engine.fused_sampler import FusedSampling  # imports triton
            except ImportError:
                self._fused = False
            else:
                self._fused = FusedSampling(device)
        return self._fused or None

    def _plain(self, logits: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
        vocab = logits.shape[1]
        block = min(self.block, vocab)
        width = -(-vocab // block) * block
        s = torch.empty(len(t["index"]), width, device=logits.device)
        s[:, vocab:] = float("-inf")  # padding to whole blocks: never drawn
        torch.div(logits[t["index"]], t["temperature"][:, None], out=s[:, :vocab])
        return ops.race_blocks(s, t["key"], block)

    def _filtered(self, logits: torch.Tensor, rows: _Rows, t: dict[str, torch.Tensor],
                  num_candidates: int) -> tuple[torch.Tensor, torch.Tensor]:
        if rows.index != list(range(logits.shape[0])):
            logits = logits[t["index"]]
        need_full_mass = any(p <= 1 and k <= 0 for p, k in zip(rows.top_p, rows.top_k))
        uses = (any(k > 0 for k in rows.top_k), any(p <= 1 for p in rows.top_p),
                any(m > 0 for m in rows.min_p))
        return ops.filtered_race(logits, t["temperature"], t["top_k"], t["top_p"], t["min_p"],
                                 t["key"], num_candidates, need_full_mass, uses)

    def _rerun(self, logits: torch.Tensor, rows: _Rows, missed: list[int], tokens: list[int],
               num_candidates: int) -> None:
        """Rows whose kept set passed the candidates: again with 16x as many, then with the
        whole vocabulary (a sort, always exact). One small copy back per round."""
        vocab = logits.shape[1]
        self.num_fallback_rows += len(missed)
        while missed:
            rows = _Rows(*([getattr(rows, f)[i] for i in missed] for f in _FIELD_NAMES))
            num_candidates = min(vocab, num_candidates * _ESCALATION)
            (t,) = self._upload([rows], logits.device)
            tok, covered = self._filtered(logits, rows, t, num_candidates)
            host = torch.cat([tok, covered.to(torch.int64)]).tolist()
            n = len(rows.index)
            for i, v in zip(rows.index, host[:n]):
                tokens[i] = v
            missed = [k for k, c in enumerate(host[n:]) if not c]

    def _num_candidates(self, rows: _Rows, vocab: int) -> int:
        """Every row's top-k set plus one (which shows whether ties run on past it);
        ``candidates`` for rows limited by top-p/min-p only (those may need the rerun)."""
        need = max(k + 1 if k > 0 else self.candidates for k in rows.top_k)
        return min(vocab, need)

    def _upload(self, groups: list[_Rows], device: torch.device) -> list[dict[str, torch.Tensor]]:
        """All groups' columns in one host -> device copy through reused buffers."""
        n = sum(len(g.index) for g in groups)
        if self._host is None or self._host.shape[1] < n or self._dev.device != device:
            cap = max(n, 64)
            pin = device.type == "cuda"
            rows = len(_INT_FIELDS) + len(_FLOAT_FIELDS)
            self._host = torch.empty(rows, cap, dtype=torch.int64, pin_memory=pin)
            self._dev = self._host if device.type == "cpu" else torch.empty_like(
                self._host, device=device)
        ints = self._host.numpy()
        floats = ints.view(np.float64)[len(_INT_FIELDS):]  # the float columns, as f64 bits
        col = 0
        for g in groups:
            m = len(g.index)
            for r, name in enumerate(_INT_FIELDS):
                ints[r, col : col + m] = getattr(g, name)
            for r, name in enumerate(_FLOAT_FIELDS):
                floats[r, col : col + m] = getattr(g, name)
            col += m
        dev = self._dev
        if dev is not self._host:
            dev[:, :n].copy_(self._host[:, :n], non_blocking=True)
        out, col = [], 0
        for g in groups:
            cols = dev[:, col : col + len(g.index)]
            f32 = cols[len(_INT_FIELDS):].view(torch.float64).to(torch.float32)  # one kernel
            out.append(dict(zip(_INT_FIELDS, cols)) | dict(zip(_FLOAT_FIELDS, f32)))
            col += len(g.index)
        return out


_ESCALATION = 16  # candidates grow by this factor per rerun round (topk(16k) << a sort)
_INT_FIELDS = ("index", "top_k", "key")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p")
_FIELD_NAMES = list(_Rows.__dataclass_fields__)


def _plan(seqs: list[Sequence], vocab: int) -> tuple[_Rows, _Rows]:
    """Split the sampled rows into (no filter, top-k/top-p/min-p) from their params."""
    plain, filtered = _Rows([], [], [], [], [], []), _Rows([], [], [], [], [], [])
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.temperature == 0:
            continue
        top_k = p.top_k if 0 < p.top_k < vocab else -1
        rows = filtered if (top_k > 0 or p.top_p < 1 or p.min_p > 0) else plain
        rows.index.append(i)
        rows.temperature.append(p.temperature)
        rows.top_k.append(top_k)
        rows.top_p.append(p.top_p if p.top_p < 1 else math.inf)  # inf: top-p off
        rows.min_p.append(p.min_p)
        rows.key.append(ops.row_key(seq.seed or 0, len(seq.output_token_ids)))
    return plain, filtered
