"""Sampler cost per step, side by side in one run: the batched sampler for greedy /
temperature / top-k / top-p / min-p rows at batch 1, 8, 64 and vocab 32000 / 128256, as
ratios to the greedy step measured in the same loop, and the previous host-loop sampler
(kept below, only here) on the same logits.

Logits are Gaussian with standard deviation ``--logit-scale`` (default 4: about 2-3 nats of
entropy at vocab 128k, like an LLM's next-token distribution); the "rerun" column is the
share of filtered rows whose kept set reached past the candidates and took the exact
full-vocabulary pass. Times include the sampled ids' copy to the host (the step's sync).

    python benchmarks/bench_sampler.py [--quick] [--device cpu|cuda] [--repeat 5]
        [--candidates 4096] [--logit-scale 4] [--threads 2]

On a shared, oversubscribed CPU host use ``--threads 1``: with 2 threads every small op
waits for OpenMP wake-ups and the table measures the neighbours.

On CUDA the timings are CUDA events between ``torch.cuda.synchronize()`` calls. Prints a
markdown table; writes nothing.

    python benchmarks/bench_sampler.py --logprobs 5 [--device ...]

instead times the runner's whole sampling stage at batch 64 (``engine/logprobs.py`` ->
``engine/penalties.py`` -> sampler) with every row asking for top-K logprobs, or for a
frequency penalty, against the same rows asking for neither: the worst case for their
relative cost, since a real step also runs the model.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import bench_threads, markdown_table

from loraplex import SamplingParams
from loraplex.engine.logprobs import SampleLogprobs
from loraplex.engine.penalties import Penalties
from loraplex.engine.sampler import Sampler
from loraplex.engine.sequence import Sequence

MODES = {
    "greedy": SamplingParams(temperature=0),
    "temperature": SamplingParams(temperature=1.0),
    "top-k 50": SamplingParams(temperature=1.0, top_k=50),
    "top-p 0.95": SamplingParams(temperature=1.0, top_p=0.95),
    "min-p 0.05": SamplingParams(temperature=1.0, min_p=0.05),
    "k50 p0.9 m0.05": SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05),
}


class OldSampler:
    """The sampler before the batched one: rows to the host, sorted one by one in Python."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        tokens = logits.argmax(dim=-1).tolist()
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            rows = logits[sampled].float().cpu()
            for row, i in zip(rows, sampled):
                tokens[i] = self._sample_row(row, seqs[i].params)
        return tokens

    def _sample_row(self, row: torch.Tensor, p: SamplingParams) -> int:
        row = (row - row.max()) / p.temperature
        if p.top_k > 0 and p.top_k < row.numel():
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(0) - sorted_p >= p.top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self.generator).item())


def _time_ms(device: torch.device, fn, *args) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn(*args)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t0) * 1e3


def bench(batch: int, vocab: int, args, device: torch.device) -> list[list]:
    g = torch.Generator().manual_seed(batch * 7 + vocab)
    logits = (torch.randn(batch, vocab, generator=g) * args.logit_scale).to(device)
    steps = [[Sequence(i, f"r{i}", [1], p, seed=1000 + i) for i in range(batch)]
             for p in MODES.values()]
    samplers = [Sampler(candidates=args.candidates) for _ in MODES]
    for sampler, seqs in zip(samplers, steps):  # warm-up (allocator, buffers, kernels)
        sampler(logits, seqs)
    times: list[list[float]] = [[] for _ in MODES]
    for _ in range(args.repeat):  # interleaved: greedy and the others see the same machine
        for k, (sampler, seqs) in enumerate(zip(samplers, steps)):
            for s in seqs:  # a new step index each call, as in decoding
                s.output_token_ids.append(0)
            times[k].append(_time_ms(device, sampler, logits, seqs))
    greedy_ms = statistics.median(times[0])
    old_ok = not args.quick or batch * vocab <= 8 * 32000
    rows = []
    for k, name in enumerate(MODES):
        ms = statistics.median(times[k])
        filtered = batch * (args.repeat + 1) if k >= 2 else 0
        rerun = f"{samplers[k].num_fallback_rows / filtered:.0%}" if filtered else "-"
        old = "-"
        if old_ok:
            old_ms = _time_ms(device, OldSampler(), logits, steps[k])
            old = f"{old_ms:.2f} ({old_ms / greedy_ms:.0f}x)"
        rows.append([batch, vocab, name, f"{ms:.3f}", f"{ms / greedy_ms:.2f}", rerun, old])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=None, help="timed calls per mode (median)")
    ap.add_argument("--quick", action="store_true",
                    help="3 repeats; the old sampler only where batch * vocab <= 8 * 32000")
    ap.add_argument("--logit-scale", type=float, default=4.0)
    ap.add_argument("--candidates", type=int, default=4096,
                    help="Sampler(candidates=...): filtered rows' first pass")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--logprobs", type=int, default=None,
                    help="time the sampling stage with top-K logprobs / penalties vs plain")
    args = ap.parse_args()
    args.repeat = args.repeat or (3 if args.quick else 10)
    bench_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    if args.logprobs is not None:
        return bench_stage(args, device, name)
    rows = []
    with torch.inference_mode():
        for vocab in (32000, 128256):
            for batch in (1, 8, 64):
                rows += bench(batch, vocab, args, device)
    print(f"Sampler step cost on {name} (median of {args.repeat}; logits N(0, "
          f"{args.logit_scale}^2); {args.candidates} candidates)\n")
    print(markdown_table(["batch", "vocab", "rows", "ms / step", "x greedy",
                          "rerun", "old sampler ms (x greedy)"], rows))


def _stage(penalties: Penalties, sampler: Sampler, logits: torch.Tensor, seqs) -> None:
    """The runner's sampling stage (``ModelRunner._sample``), step bookkeeping included."""
    lp = SampleLogprobs.start(logits, seqs)
    sampled = sampler(penalties(logits, seqs), seqs)
    penalties.record(seqs, sampled.token_ids)
    if lp is not None:
        lp.finish(sampled.token_ids)
    for s, t in zip(seqs, sampled.token_ids):
        s.output_token_ids.append(t)


def bench_stage(args, device: torch.device, name: str, batch: int = 64) -> None:
    rows = []
    for vocab in (32000, 128256):
        g = torch.Generator().manual_seed(vocab)
        logits = (torch.randn(batch, vocab, generator=g) * args.logit_scale).to(device)
        for temp in (0.0, 1.0):
            kinds = {"plain": {}, f"logprobs={args.logprobs}": dict(logprobs=args.logprobs),
                     "frequency_penalty=0.5": dict(frequency_penalty=0.5)}
            setups = []
            for kw in kinds.values():
                p = SamplingParams(temperature=temp, **kw)
                seqs = [Sequence(i, f"r{i}", [1, 2, 3], p, seed=i) for i in range(batch)]
                setups.append((Penalties([2]), Sampler(), seqs))
            times: list[list[float]] = [[] for _ in kinds]
            for r in range(args.repeat + 1):  # the first round warms up
                for k, (pen, sampler, seqs) in enumerate(setups):
                    ms = _time_ms(device, _stage, pen, sampler, logits.clone(), seqs)
                    if r:
                        times[k].append(ms)
            plain = statistics.median(times[0])
            for k, kind in enumerate(kinds):
                ms = statistics.median(times[k])
                rows.append([vocab, "greedy" if temp == 0 else "T=1", kind, f"{ms:.3f}",
                             f"{ms / plain:.2f}x"])
    print(f"Sampling stage at batch {batch} on {name} (median of {args.repeat}; logits "
          f"N(0, {args.logit_scale}^2); the logits' clone is timed in every row)\n")
    print(markdown_table(["vocab", "rows", "asks for", "ms / step", "x plain"], rows))


if __name__ == "__main__":
    main()
