"""Where the CPU LoRA prefill's time goes: the engine's prefill of bench_lora.py's scattered
mix (16 rank-16 adapters on all seven projections, in scattered slots of 32) and of the base
model, each part timed inside the engine: per projection its LoRA shrink, base GEMM and LoRA
expand where they run as calls of their own, the MLP activation (with LoRA: the fused gate/up
expand + activation + down shrink), the norms (with LoRA: the o and down expands before them
and the qkv and gate/up shrinks after them, fused in), the rotary (with LoRA: the qkv expand
fused in), attention, the embedding, the logits, and the rest of the step (scheduling, the
LoRA batch, sampling). Base and LoRA prefills
alternate for ``--rounds`` rounds; each cell is the median over the rounds of that part's
total time in one prefill.

The timers wrap the modules' and ops' calls (``time.perf_counter`` around each, which on CPU
is synchronous), so a part's time includes its Python call; the wrappers add a few
microseconds per call to both runs alike.

    python benchmarks/bench_prefill_split.py [--layers 4] [--rounds 7] [--write-docs]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_lora import prefill_time
from common import (
    add_write_docs_flag,
    bench_threads,
    make_adapters,
    make_bench_model,
    markdown_table,
    report,
)

import loraplex.lora.layers as lora_layers
from loraplex import LLM
from loraplex.layers.attention import Attention
from loraplex.layers.norm import RMSNorm
from loraplex.layers.rotary import ApplyRotary
from loraplex.lora.layers import LoRAEmbedding, LoRALinear, LoRANorm, LoRARotary

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
ACT = "MLP activation (LoRA: + gate/up expand + down shrink)"
NORMS = "norms (LoRA: + o/down expands + qkv/gate_up shrinks)"
ROTARY = "rotary (LoRA: + qkv expand)"
FAULTS = "minor page faults in the prefill (count)"


class Timers:
    """Accumulates seconds per part name while ``recording``."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = collections.defaultdict(float)

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[name] += time.perf_counter() - t
        return timed


@contextlib.contextmanager
def instrumented(llm: LLM, timers: Timers):
    """Timers around every part of ``llm``'s model (instance attributes, restored after)."""
    model = llm.engine.runner.model
    saved: list[tuple[object, str, object]] = []

    def patch(obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)
        if fn is not None:
            saved.append((obj, attr, obj.__dict__.get(attr)))
            setattr(obj, attr, timers.wrap(name, fn))

    for layer in model.model.layers:
        for proj in PROJECTIONS:
            parent = layer.self_attn if proj in ("qkv_proj", "o_proj") else layer.mlp
            w = getattr(parent, proj)
            label = proj.removesuffix("_proj")
            if isinstance(w, LoRALinear):
                patch(w, "shrink", f"{label} LoRA shrink")
                patch(w, "expand", f"{label} LoRA expand")
                patch(w, "expand_silu_mul", ACT)
                w = w.base
            patch(w, "forward", f"{label} GEMM")
    wrapped = {id(m.base) for m in model.modules() if isinstance(m, LoRANorm | LoRARotary)}
    for m in model.modules():
        if isinstance(m, Attention):
            patch(m, "forward", "attention")
        elif isinstance(m, LoRARotary) or (isinstance(m, ApplyRotary) and id(m) not in wrapped):
            patch(m, "forward", ROTARY)
        elif isinstance(m, LoRANorm) or (isinstance(m, RMSNorm) and id(m) not in wrapped):
            patch(m, "forward", NORMS)
            patch(m, "add_forward", NORMS)
        elif isinstance(m, LoRAEmbedding):
            patch(m, "forward", "embedding")
    patch(model, "compute_logits", "logits")
    act = lora_layers.silu_and_mul  # the base path's activation (the LoRA path's when unfused)
    lora_layers.silu_and_mul = timers.wrap(ACT, act)
    try:
        yield
    finally:
        lora_layers.silu_and_mul = act
        for obj, attr, old in reversed(saved):
            if old is None:
                delattr(obj, attr)
            else:
                setattr(obj, attr, old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    add_write_docs_flag(ap)
    args = ap.parse_args()
    bench_threads(args.threads)
    n = args.adapters
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = make_bench_model(root / "model", num_hidden_layers=args.layers)
        dirs = make_adapters(hf, root, 2 * n, 16)
        llm = LLM(str(root / "model"), adapters=dirs, device="cpu",
                  max_num_seqs=max(args.batch, 2 * n), max_loras_per_batch=2 * n,
                  max_lora_rank=16, enable_prefix_caching=False)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 32000, (args.batch, args.prompt_len), generator=g).tolist()
        for i in range(2 * n):  # lora{i} into slot i, one at a time
            prefill_time(llm, prompts[:1], [f"lora{i}"])
        picked = random.Random(0).sample(range(2 * n), n)
        cases = {"base": [None] * args.batch,
                 "LoRA": [f"lora{picked[i % n]}" for i in range(args.batch)]}
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in cases}
        for _ in range(args.rounds):
            for key, names in cases.items():
                timers = Timers()
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                with instrumented(llm, timers):
                    total = prefill_time(llm, prompts, names)
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
                parts = dict(timers.totals)
                parts["rest of the step"] = total - sum(parts.values())
                parts["prefill"] = total
                parts[FAULTS] = faults
                runs[key].append(parts)
    names = list(dict.fromkeys(k for r in runs["LoRA"] + runs["base"] for k in r))
    names = [k for k in names if k not in ("rest of the step", "prefill", FAULTS)]
    names += ["rest of the step", "prefill"]

    def median(key: str, part: str) -> float:
        return statistics.median(r.get(part, 0.0) for r in runs[key])

    base_total = median("base", "prefill")
    rows = []
    for part in names:
        b, lo = median("base", part), median("LoRA", part)
        rows.append([part, f"{b * 1e3:.1f}", f"{lo * 1e3:.1f}", f"{(lo - b) * 1e3:+.1f}",
                     f"{(lo - b) / base_total:+.2%}"])
    rows.append([FAULTS, f"{median('base', FAULTS):.0f}", f"{median('LoRA', FAULTS):.0f}",
                 "", ""])
    table = markdown_table(["part", "base ms", f"{n} adapters ms", "difference ms",
                            "difference / base prefill"], rows)
    body = (f"Random Llama (hidden 1024, {args.layers} layers), {args.batch} prompts x "
            f"{args.prompt_len} tokens, {n} distinct rank-16 adapters on all seven projections "
            f"in scattered slots of {2 * n}, LoRA ops \"{llm.engine.lora_backend}\"; CPU "
            f"float32, {args.threads} threads; each cell the median over {args.rounds} "
            f"rounds (base and LoRA prefills alternating) of a part's time in one prefill.\n\n"
            f"`python benchmarks/bench_prefill_split.py`\n\n{table}\n")
    report(args, "Where the CPU LoRA prefill's time goes", body)


if __name__ == "__main__":
    main()
