"""Scheduler scenarios for ``bench_serving.py --scenarios``: prefix caching, chunked prefill
and fair admission, each measured on and off in one run, in process (the engine's own
``step()`` loop; arrivals are counted in engine steps, times are wall clock).

(a) A shared system prompt plus short user turns over 8 adapters, requests one at a time:
    TTFT p50 with prefix caching on vs off.
(b) 8 streams decoding while long prompts arrive: inter-token p50 / p99 of the streams with
    chunked prefill on vs off.
(c) Skewed adapter popularity with 2 adapter slots, so the queue head waits for a slot:
    base-model requests' TTFT p99 with fair admission vs FIFO (``MAX_HEAD_BYPASS = 0``).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from loraplex.engine import scheduler as scheduler_mod
from loraplex.engine.llm_engine import LLMEngine
from loraplex.sampling_params import SamplingParams


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


class Clock:
    """Per-request first-token time and inter-token gaps, fed the outputs of each step."""

    def __init__(self) -> None:
        self.arrival: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.ttft: dict[str, float] = {}
        self.gaps: dict[str, list[float]] = {}

    def add(self, engine: LLMEngine, rid: str, prompt: list[int], sp: SamplingParams,
            adapter: str | None) -> None:
        engine.add_request(rid, prompt, sp, adapter)
        self.arrival[rid] = time.perf_counter()

    def step(self, engine: LLMEngine) -> list:
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if not o.token_ids:
                continue
            if o.request_id not in self.ttft:
                self.ttft[o.request_id] = now - self.arrival[o.request_id]
            else:
                self.gaps.setdefault(o.request_id, []).append(now - self.last[o.request_id])
            self.last[o.request_id] = now
        return outs


def _engine(model_dir: Path, adapters: dict[str, str], **kw) -> LLMEngine:
    return LLMEngine.from_args(str(model_dir), adapters=adapters, device="cpu",
                               max_lora_rank=16, **kw)


def prefix_caching(model_dir: Path, adapters: dict[str, str], system_len: int,
                   rounds: int) -> list[list[str]]:
    names = list(adapters)[:8]
    rng = random.Random(0)
    system = [rng.randrange(3, 30000) for _ in range(system_len)]
    rows = []
    for on in (False, True):
        engine = _engine(model_dir, adapters, enable_prefix_caching=on,
                         max_model_len=system_len + 64, num_kv_blocks=4096)
        clock = Clock()
        sp = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        for i in range(rounds * len(names)):
            user = [rng.randrange(3, 30000) for _ in range(16)]
            clock.add(engine, f"r{i}", system + user, sp, names[i % len(names)])
            while engine.has_unfinished_requests():
                clock.step(engine)
        ttft = [t * 1e3 for t in clock.ttft.values()]
        rows.append([f"prefix caching {'on' if on else 'off'}", f"{pct(ttft, 50):.0f}",
                     f"{pct(ttft, 99):.0f}"])
    return rows


def chunked_prefill(model_dir: Path, adapters: dict[str, str], prompt_len: int, budget: int,
                    arrivals: int) -> list[list[str]]:
    """8 adapter streams decode while ``arrivals`` long base-model prompts arrive one after
    another; after each arrival the engine steps until that prompt's first token, then 10
    more steps, in both modes (so the off mode's one long step is in the same window as the
    on mode's chunks). Inter-token gaps of the streams: p50, p99, max (the longest stall), and
    the long prompts' TTFT (what chunking costs them)."""
    names = list(adapters)[:8]
    rows = []
    for on in (False, True):
        rng = random.Random(1)
        engine = _engine(model_dir, adapters, enable_chunked_prefill=on,
                         enable_prefix_caching=False, max_num_batched_tokens=budget,
                         max_model_len=prompt_len + 64, num_kv_blocks=4096)
        clock = Clock()
        streams = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
        for i, name in enumerate(names):
            clock.add(engine, f"s{i}", [rng.randrange(3, 30000) for _ in range(32)], streams,
                      name)
        for _ in range(5):  # every stream is decoding
            clock.step(engine)
        long_sp = SamplingParams(max_tokens=1, ignore_eos=True)
        for k in range(arrivals):
            prompt = [rng.randrange(3, 30000) for _ in range(prompt_len)]
            clock.add(engine, f"long{k}", prompt, long_sp, None)
            while f"long{k}" not in clock.ttft:
                clock.step(engine)
            for _ in range(10):
                clock.step(engine)
        gaps = [g * 1e3 for rid, gs in clock.gaps.items() if rid.startswith("s") for g in gs]
        p50, p99 = pct(gaps, 50), pct(gaps, 99)
        ttft = pct([clock.ttft[f"long{k}"] * 1e3 for k in range(arrivals)], 50)
        rows.append([f"chunked prefill {'on' if on else 'off'}", f"{p50:.0f}", f"{p99:.0f}",
                     f"{p99 / p50:.1f}x", f"{max(gaps):.0f}", f"{ttft:.0f}"])
    return rows


def fair_admission(model_dir: Path, adapters: dict[str, str], num_requests: int
                   ) -> list[list[str]]:
    names = list(adapters)[:6]
    rows = []
    for fair in (False, True):
        rng = random.Random(2)
        saved = scheduler_mod.MAX_HEAD_BYPASS
        scheduler_mod.MAX_HEAD_BYPASS = saved if fair else 0  # 0: nothing passes the head
        try:
            engine = _engine(model_dir, adapters, max_loras_per_batch=2, max_num_seqs=16,
                             num_kv_blocks=2048, max_model_len=512)
            clock = Clock()
            for i in range(num_requests):
                base = rng.random() < 0.3
                # Zipf-like skew: a few adapters take most requests, the tail waits for slots
                name = None if base else names[min(int(rng.paretovariate(1.2)) - 1, 5)]
                sp = SamplingParams(max_tokens=rng.randrange(8, 24), temperature=0.0,
                                    ignore_eos=True)
                clock.add(engine, f"{'base' if base else 'lora'}{i}",
                          [rng.randrange(3, 30000) for _ in range(32)], sp, name)
                if i % 2:
                    clock.step(engine)
            while engine.has_unfinished_requests():
                clock.step(engine)
        finally:
            scheduler_mod.MAX_HEAD_BYPASS = saved
        base = [t * 1e3 for rid, t in clock.ttft.items() if rid.startswith("base")]
        lora = [t * 1e3 for rid, t in clock.ttft.items() if rid.startswith("lora")]
        rows.append([f"{'fair admission' if fair else 'FIFO'}", f"{pct(base, 50):.0f}",
                     f"{pct(base, 99):.0f}", f"{pct(lora, 99):.0f}"])
    return rows
