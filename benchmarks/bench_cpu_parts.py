"""The CPU engine choices that bench_engine.py does not isolate, each A/B side by side in one
run (interleaved, best of ``--repeat``), on the ~150M benchmark model's shapes, float32:

  (a) prefill attention: one causal call per group of equal-length prompts vs one per prompt;
  (b) decode attention (gather + SDPA, batch 32, ~150-token contexts): an additive mask built
      once per step vs a bool mask built in every layer (the code before);
  (c) a 32 x 128-token prefill in steps of 2048 vs 1024 tokens (the CPU default budget), with
      the minor page faults each run took;
  (d) the torch LoRA op for one gate/up projection at decode, 32 distinct rank-16 adapters:
      ``lora_shrink`` + ``lora_expand`` vs the bare bmm/add_ calls they make (the difference
      is the op's Python work per call);
  (e) the torch LoRA ops over the four projections of one layer of the LoRA benchmark
      (bench_lora.py: rank 16, 16 adapters in scattered slots of 32), decode-shaped (32 rows,
      2 per adapter) and prefill-shaped (1024 rows, 128 per adapter): the op vs its
      alternative, the batch's A/B gathered into scratch and one ``bmm`` for all segments;
  (f) one layer's four projections with their LoRA, and the MLP activation after gate/up,
      prefill-shaped as the LoRA benchmark's 1024-token steps (8 adapters x 128 rows,
      scattered slots, prepacked base weights): the base GEMMs (+ activation) alone; the LoRA
      layer's order (shrink while x is in cache, base GEMM, then an in-place expand into its
      output) with the torch backend's ops and with the C ones (``lora_cpu``, what the engine
      runs: on AVX-512 CPUs the gate/up expand inside the activation), and the C ones without
      that fusion; the delta first (shrink, expand with beta=0 into a preallocated scratch)
      then added in the base GEMM's epilogue (oneDNN's binary-add post-op); and the torch ops
      with their GEMMs on one thread (different only at --threads > 1);
  (g) the C backend's shrink over one layer's four projections (16 or 8 scattered adapters,
      decode- and prefill-shaped): its AVX-512 kernel vs torch's BLAS GEMM;
  (h) the gated MLP's activation on a prefill-shaped gate/up output (1024 x 2 x 2816, evicted
      from the caches first, as after the GEMM that wrote it): the C ``silu(gate) * up`` vs
      torch's two ops; then with the LoRA delta (8 adapters x 128 rows, rank 16): the expand
      fused into the C activation (the engine's path) vs the expand into the output, then
      the C activation;
  (i) an op run right after a prefill-sized base GEMM (1024 x 1024 -> 5632, prepacked) against
      the same op run again at once (hot): a one-element torch add, and the C expand of one
      projection (8 adapters x 128 rows) through ``lora_cpu.lora_expand`` and as the bare C
      call with its arguments made beforehand (the host work the op's wrapper adds);
  (j) the residual add + RMSNorm of a prefill-shaped projection output (1024 x 1024, evicted
      from the caches first): the C pass vs torch's ops; then with LoRA on either side
      (8 adapters x 128 rows, rank 16: o's expand before it, gate/up's shrink after it):
      fused into the norm's pass (the engine's path) vs the expand, the C norm and the shrink
      apart;
  (k) the C backend's expand over one layer's four projections (16 or 8 scattered adapters,
      decode- and prefill-shaped, and in 32-row blocks as the norms and the rotary run it):
      its AVX-512 kernel vs torch's BLAS GEMM (``simd`` switched); and the rotary of q/k of a
      prefill-shaped qkv output: the C pass (in place) vs torch's ops.

    python benchmarks/bench_cpu_parts.py [--threads 2] [--clock wall] [--repeat 8] \
        [--parts abcdefghijk] [--write-docs]

``--clock cpu`` times with the process's CPU time (use it with ``--threads 1`` on a shared host:
it does not count the time the process waited for a core).

Prints the table; ``--write-docs`` also writes it into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import add_write_docs_flag, bench_threads, make_bench_model, markdown_table, report

from loraplex import LLM, SamplingParams
from loraplex.layers.activation import silu_and_mul
from loraplex.layers.attention import Attention
from loraplex.layers.forward_context import ForwardBatch, forward_context
from loraplex.layers.prefill_groups import plan_prefill
from loraplex.ops import lora_cpu, lora_torch
from loraplex.ops.elementwise import cpu_rms_norm, cpu_silu_mul
from loraplex.ops.lora_meta import LoRABatch
from loraplex.ops.lora_torch import lora_expand, lora_shrink

HEADS, KV_HEADS, D = 16, 4, 64


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved(fns: dict, repeat: int, clock=time.perf_counter) -> dict[str, float]:
    """Best time (s, by ``clock``) of each callable, the callables interleaved ``repeat``
    times."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t = clock()
            fn()
            best[name] = min(best[name], clock() - t)
    return best


def prefill_attention(num_seqs: int, n: int, repeat: int, clock) -> dict[str, float]:
    t = num_seqs * n
    qkv = torch.randn(t, (HEADS + 2 * KV_HEADS) * D)
    q = qkv[:, : HEADS * D].view(t, HEADS, D)
    k = qkv[:, HEADS * D : (HEADS + KV_HEADS) * D].view(t, KV_HEADS, D)
    v = qkv[:, (HEADS + KV_HEADS) * D :].view(t, KV_HEADS, D)
    cu = list(range(0, t + 1, n))
    attn = Attention(0, HEADS, KV_HEADS, D)

    def call(max_waste: float):
        plan = plan_prefill(cu, q.device, max_waste=max_waste)  # 0: every prompt alone
        batch = ForwardBatch(is_prefill=True, num_tokens=t, slot_mapping=None, cu_seqlens=cu,
                             prefill_groups=plan)

        def fn():
            with forward_context(batch):
                attn(q, k, v)
        return fn

    def before():  # the code before: per prompt, [kv_heads, group, n, d] with k/v expanded
        out = torch.empty_like(q)
        shape = (KV_HEADS, HEADS // KV_HEADS, n, D)
        for s in cu[:-1]:
            qs = q[s : s + n].view(n, KV_HEADS, HEADS // KV_HEADS, D).permute(1, 2, 0, 3)
            ks = k[s : s + n].transpose(0, 1).unsqueeze(1).expand(shape)
            vs = v[s : s + n].transpose(0, 1).unsqueeze(1).expand(shape)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=D**-0.5)
            out[s : s + n] = o.permute(2, 0, 1, 3).reshape(n, HEADS, D)

    return interleaved({"grouped": call(1.25), "per prompt": call(0.0), "before": before},
                       repeat, clock)


def decode_attention(bsz: int, ctx: int, layers: int, repeat: int, clock) -> dict[str, float]:
    bs, num_blocks = 16, 4096
    width = -(-ctx // bs)
    caches = [(torch.randn(num_blocks, bs, KV_HEADS, D), torch.randn(num_blocks, bs, KV_HEADS, D))
              for _ in range(layers)]
    tables = torch.randperm(num_blocks)[: bsz * width].view(bsz, width)
    lens = torch.randint(ctx - 15, ctx + 1, (bsz,))
    q = torch.randn(bsz, HEADS, D)
    length, group = width * bs, HEADS // KV_HEADS

    def step(shared: bool):
        mask = None
        for kc, vc in caches:
            flat = tables.reshape(-1)
            keys = kc.index_select(0, flat).view(bsz, length, KV_HEADS, D).transpose(1, 2)
            values = vc.index_select(0, flat).view(bsz, length, KV_HEADS, D).transpose(1, 2)
            if not shared:  # the code before: a bool mask per layer
                mask = (torch.arange(length)[None, :] < lens[:, None])[:, None, None, :]
            elif mask is None:  # ForwardBatch.decode_mask: additive, once per step
                past = torch.arange(length)[None, :] >= lens[:, None]
                mask = torch.zeros(past.shape).masked_fill_(past, float("-inf"))[:, None, None]
            F.scaled_dot_product_attention(q.view(bsz, KV_HEADS, group, D), keys, values,
                                           attn_mask=mask, scale=D**-0.5)

    return interleaved({"mask once per step": lambda: step(True),
                        "bool mask per layer": lambda: step(False)}, repeat, clock)


def prefill_steps(budgets: list[int], repeat: int, clock) -> dict[str, tuple[float, int]]:
    with tempfile.TemporaryDirectory() as tmp:
        make_bench_model(Path(tmp))
        llms = {b: LLM(tmp, device="cpu", max_num_seqs=32, max_num_batched_tokens=b,
                       enable_prefix_caching=False)  # the same prompts every repeat
                for b in budgets}
        ids = torch.randint(3, 32000, (32, 128), generator=torch.Generator().manual_seed(0))
        sp = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
        faults: dict[int, int] = {}

        def run(b: int):
            def fn():
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                llms[b].generate(ids.tolist(), sp)
                faults[b] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
            return fn

        best = interleaved({b: run(b) for b in budgets}, repeat, clock)
        return {f"{b}-token steps": (best[b], faults[b]) for b in budgets}


def lora_op_overhead(adapters: int, rank: int, repeat: int, clock) -> dict[str, float]:
    hidden, inter = 1024, 2816
    a = torch.randn(adapters, 2 * rank, hidden)  # pool [S, n*R, in], both slices at full rank
    b = torch.randn(adapters, 2 * inter, rank)  # [S, out, R]
    ranks = torch.full((adapters, 2), rank, dtype=torch.int32)
    scalings = torch.full((adapters, 2), 2.0)
    batch = LoRABatch.from_token_slots(list(range(adapters)))  # one token per adapter
    x, h, y = torch.randn(adapters, hidden), torch.empty(adapters, 2 * rank), torch.randn(
        adapters, 2 * inter)
    offsets = (0, inter, 2 * inter)

    def op():
        lora_shrink(x, a, ranks, batch, h)
        lora_expand(h, b, ranks, scalings, offsets, batch, y)

    def bare():
        hh = torch.bmm(x.view(adapters, 1, hidden), a.transpose(1, 2))
        for i in range(2):
            c0, c1 = offsets[i], offsets[i + 1]
            delta = torch.bmm(hh[:, :, i * rank : (i + 1) * rank], b[:, c0:c1].transpose(1, 2))
            y[:, c0:c1].add_(delta.view(adapters, -1), alpha=2.0)

    return interleaved({"op": op, "bare": bare}, repeat, clock)


def lora_op_vs_gathered(rows: int, per_adapter: int, repeat: int, clock) -> dict[str, float]:
    hidden, inter, rank, num_slots = 1024, 2816, 16, 32
    projs = {"qkv": (hidden, (1024, 256, 256)), "o": (hidden, (1024,)),
             "gate_up": (hidden, (inter, inter)), "down": (inter, (hidden,))}
    used = random.Random(0).sample(range(num_slots), rows // per_adapter)
    batch = LoRABatch.from_token_slots([used[t // per_adapter] for t in range(rows)])
    idx = torch.tensor(used)
    k = len(used)
    layer = []
    for in_f, widths in projs.values():
        n = len(widths)
        offsets = tuple(sum(widths[:i]) for i in range(n + 1))
        layer.append(dict(
            x=torch.randn(rows, in_f), a=torch.randn(num_slots, n * rank, in_f),
            b=torch.randn(num_slots, offsets[-1], rank), offsets=offsets,
            ranks=torch.full((num_slots, n), rank, dtype=torch.int32),
            scalings=torch.full((num_slots, n), 2.0), h=torch.empty(rows, n * rank),
            y=torch.randn(rows, offsets[-1]), ag=torch.empty(k, n * rank, in_f),
            bg=torch.empty(k, offsets[-1], rank), s=torch.empty(k, n)))

    def op():
        for p in layer:
            lora_shrink(p["x"], p["a"], p["ranks"], batch, p["h"])
            lora_expand(p["h"], p["b"], p["ranks"], p["scalings"], p["offsets"], batch, p["y"])

    def gathered():  # what the op does not do: gather once per call, one bmm per slice
        for p in layer:
            n, off = p["ranks"].shape[1], p["offsets"]
            torch.index_select(p["a"], 0, idx, out=p["ag"])
            torch.bmm(p["x"].view(k, per_adapter, -1), p["ag"].transpose(1, 2),
                      out=p["h"].view(k, per_adapter, -1))
            torch.index_select(p["b"], 0, idx, out=p["bg"])
            torch.index_select(p["scalings"], 0, idx, out=p["s"])
            hv, yv = p["h"].view(k, per_adapter, -1), p["y"].view(k, per_adapter, -1)
            for i in range(n):
                bi = p["bg"][:, off[i] : off[i + 1]]
                bi.mul_(p["s"][:, i, None, None])
                yv[:, :, off[i] : off[i + 1]].baddbmm_(hv[:, :, i * rank : (i + 1) * rank],
                                                      bi.transpose(1, 2))

    with torch.inference_mode():  # as the engine runs (cheaper views)
        return interleaved({"op": op, "gathered": gathered}, repeat, clock)


def c_shrink_kernels(rows: int, per_adapter: int, repeat: int, clock) -> dict[str, float]:
    """(g): the C backend's shrink over one layer's four projections, its AVX-512 kernel
    against torch's BLAS GEMM (the same calls, ``simd`` switched)."""
    hidden, inter, rank, num_slots = 1024, 2816, 16, 32
    used = random.Random(0).sample(range(num_slots), rows // per_adapter)
    batch = LoRABatch.from_token_slots([used[t // per_adapter] for t in range(rows)])
    layer = [(torch.randn(rows, in_f), torch.randn(num_slots, n * rank, in_f),
              torch.full((num_slots, n), rank, dtype=torch.int32), torch.empty(rows, n * rank))
             for in_f, n in ((hidden, 3), (hidden, 1), (hidden, 2), (inter, 1))]

    def work():
        for x, a, ranks, h in layer:
            lora_cpu.lora_shrink(x, a, ranks, batch, h)

    return simd_against_blas(work, repeat, clock)


def simd_against_blas(work, repeat: int, clock) -> dict[str, float]:
    """``work``'s C calls with the library's AVX-512 kernels and with torch's BLAS GEMM
    (``simd`` switched), interleaved: {"avx512": s, "blas": s}."""
    lib = lora_cpu._native()

    def run(simd: int):
        def fn():
            lib.simd = simd
            work()
        return fn

    saved = lib.simd
    try:
        return interleaved({"avx512": run(1), "blas": run(0)}, repeat, clock)
    finally:
        lib.simd = saved


def c_expand_kernels(rows: int, per_adapter: int, block: int, repeat: int,
                     clock) -> dict[str, float]:
    """(k): the C backend's expand over one layer's four projections (qkv, o, gate/up, down),
    in calls over ``block`` rows each, its AVX-512 kernel against torch's BLAS GEMM (the same
    calls, ``simd`` switched)."""
    hidden, inter, rank, num_slots, q, kv = 1024, 2816, 16, 32, 1024, 256
    used = random.Random(0).sample(range(num_slots), rows // per_adapter)
    slots = [used[t // per_adapter] for t in range(rows)]
    batches = [LoRABatch.from_token_slots(slots[i : i + block]) for i in range(0, rows, block)]
    layer = []
    for widths in ((q, kv, kv), (hidden,), (inter, inter), (hidden,)):
        n, out = len(widths), sum(widths)
        offsets = tuple(int(v) for v in torch.tensor((0, *widths)).cumsum(0))
        layer.append((torch.randn(rows, n * rank), torch.randn(num_slots, out, rank) * 0.1,
                      torch.full((num_slots, n), rank, dtype=torch.int32),
                      torch.full((num_slots, n), 2.0), offsets, torch.zeros(rows, out)))

    def work():
        for h, b, ranks, scalings, offsets, y in layer:
            for i, batch in enumerate(batches):
                rows_ = slice(i * block, (i + 1) * block)
                lora_cpu.lora_expand(h[rows_], b, ranks, scalings, offsets, batch, y[rows_])

    return simd_against_blas(work, repeat, clock)


def rotary_ops(repeat: int, clock) -> dict[str, float]:
    """(k): the rotary of q and k (16 + 4 heads of 64) in a 1024-row qkv output: the C pass in
    place against torch's ops (a fresh tensor)."""
    from loraplex.config import RopeConfig
    from loraplex.layers.rotary import RotaryEmbedding

    rows, heads, d = 1024, 20, 64
    emb = RotaryEmbedding(d, 4096, RopeConfig())
    rope = emb.lookup(torch.randint(0, 4096, (rows,)), torch.float32)
    qkv = torch.randn(rows, (heads + 4) * d)
    x = qkv[:, : heads * d].view(rows, heads, d)
    return interleaved({"C": lambda: lora_cpu.lora_rotary_(x, *rope, None),
                        "torch": lambda: RotaryEmbedding.rotate(rope, x)}, repeat, clock)


def lora_epilogue(repeat: int, clock) -> dict[str, float]:
    rows, per, rank, num_slots = 1024, 128, 16, 32
    hidden, inter = 1024, 2816
    projs = [(hidden, (1024, 256, 256)), (hidden, (1024,)), (hidden, (inter, inter)),
             (inter, (hidden,))]  # qkv, o, gate_up, down: (in, slice widths)
    used = random.Random(0).sample(range(num_slots), rows // per)
    batch = LoRABatch.from_token_slots([used[t // per] for t in range(rows)])
    linear = torch.ops.mkldnn._linear_pointwise
    g = torch.Generator().manual_seed(0)
    layer = []
    for in_f, widths in projs:
        n, out_f = len(widths), sum(widths)
        layer.append(dict(
            x=torch.randn(rows, in_f, generator=g),
            w=torch.ops.mkldnn._reorder_linear_weight(torch.randn(out_f, in_f, generator=g)),
            a=torch.randn(num_slots, n * rank, in_f, generator=g),
            b=torch.randn(num_slots, out_f, rank, generator=g),
            offsets=tuple(sum(widths[:i]) for i in range(n + 1)),
            ranks=torch.full((num_slots, n), rank, dtype=torch.int32),
            scalings=torch.full((num_slots, n), 2.0)))
    h = torch.empty(rows, 3 * rank)  # scratch shared by the projections, as in the engine
    delta = torch.empty(rows, 2 * inter)
    threads = torch.get_num_threads()

    def act(p, y):  # the MLP activation after gate/up (the engine's: C on AVX-512 CPUs)
        return silu_and_mul(y) if p is layer[2] else y

    def base():
        return [act(p, linear(p["x"], p["w"], None, "none", [], "")) for p in layer]

    def engine(lora_batch: LoRABatch, lora_threads: int, ops=lora_torch, fused=False):
        def fn():  # lora_threads: for the LoRA GEMMs; ops: the backend module
            ys = []
            for p in layer:
                hp = h[:, : p["a"].shape[1]]
                torch.set_num_threads(lora_threads)
                ops.lora_shrink(p["x"], p["a"], p["ranks"], lora_batch, hp)  # x still in cache
                torch.set_num_threads(threads)
                y = linear(p["x"], p["w"], None, "none", [], "")
                args = (hp, p["b"], p["ranks"], p["scalings"], p["offsets"], lora_batch, y)
                if fused and p is layer[2]:  # the engine's gate/up: expand inside the activation
                    ys.append(ops.lora_expand_silu_mul(*args))
                    continue
                torch.set_num_threads(lora_threads)
                ops.lora_expand(*args)
                torch.set_num_threads(threads)
                ys.append(act(p, y))
            return ys
        return fn

    def epilogue():  # delta first, added by the base GEMM's post-op while y is in cache
        ys = []
        for p in layer:
            off, n = p["offsets"], len(p["offsets"]) - 1
            hp = h[:, : p["a"].shape[1]]
            d = delta[:, : off[-1]]
            lora_shrink(p["x"], p["a"], p["ranks"], batch, hp)
            for start, length, slot in batch.host_segs:  # beta=0: no zeroing pass first
                rs = slice(start, start + length)
                for i in range(n):
                    d[rs, off[i] : off[i + 1]].addmm_(
                        hp[rs, i * rank : (i + 1) * rank], p["b"][slot, off[i] : off[i + 1]].T,
                        beta=0, alpha=2.0)
            ys.append(act(p, torch.ops.mkldnn._linear_pointwise.binary(p["x"], d, p["w"], None,
                                                                      "add")))
        return ys

    fused = not lora_cpu.unavailable_reason() and lora_cpu._native().simd
    fns = {"base": base, "engine": engine(batch, threads), "epilogue": epilogue,
           "one thread": engine(batch, 1), "C ops": engine(batch, threads, lora_cpu, fused),
           "C ops, unfused": engine(batch, threads, lora_cpu)}
    with torch.inference_mode():
        want = fns["engine"]()
        for name in list(fns)[2:]:  # every variant computes the same
            for y, ref in zip(fns[name](), want, strict=True):  # (random weights: large y)
                torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
        return interleaved(fns, repeat, clock)


def gate_up_activation(repeat: int, clock) -> dict[str, float]:
    """(h): best time of each way to get the MLP activation of a gate/up output, ``y``
    restored and the caches flushed (a 64 MB pass) before every call, outside the timing."""
    rows, per, rank, num_slots, inter = 1024, 128, 16, 32, 2816
    used = random.Random(0).sample(range(num_slots), rows // per)
    batch = LoRABatch.from_token_slots([used[t // per] for t in range(rows)])
    g = torch.Generator().manual_seed(0)
    b = torch.randn(num_slots, 2 * inter, rank, generator=g) * 0.1
    ranks = torch.full((num_slots, 2), rank, dtype=torch.int32)
    scalings, offsets = torch.full((num_slots, 2), 2.0), (0, inter, 2 * inter)
    h = torch.randn(rows, 2 * rank, generator=g)
    y0 = torch.randn(rows, 2 * inter, generator=g)
    y = y0.clone()

    def torch_act():
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)

    def unfused():
        lora_cpu.lora_expand(h, b, ranks, scalings, offsets, batch, y)
        return cpu_silu_mul(y)

    fns = {"torch act": torch_act, "C act": lambda: cpu_silu_mul(y), "unfused": unfused,
           "fused": lambda: lora_cpu.lora_expand_silu_mul(h, b, ranks, scalings, offsets,
                                                          batch, y)}
    y.copy_(y0)
    torch.testing.assert_close(fns["fused"](), unfused(), rtol=1e-5, atol=1e-5)
    return flushed_best(fns, repeat, clock, lambda: y.copy_(y0))


def flushed_best(fns: dict, repeat: int, clock, restore) -> dict[str, float]:
    """Best time of each callable over ``repeat`` interleaved rounds, ``restore()`` run and
    the caches flushed (a 64 MB pass) before every call, outside the timing."""
    flush = torch.empty(16 << 20)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            restore()
            flush.add_(1.0)
            t = clock()
            fn()
            best[name] = min(best[name], clock() - t)
    return best


def add_norm(repeat: int, clock) -> dict[str, float]:
    """(j): best time of each way to get the RMSNorm of a projection output plus the
    residual, ``x`` restored and the caches flushed (a 64 MB pass) before every call,
    outside the timing."""
    rows, per, rank, num_slots, hidden = 1024, 128, 16, 32, 1024
    used = random.Random(0).sample(range(num_slots), rows // per)
    batch = LoRABatch.from_token_slots([used[t // per] for t in range(rows)])
    g = torch.Generator().manual_seed(0)
    b = torch.randn(num_slots, hidden, rank, generator=g) * 0.1  # o's B
    ranks1 = torch.full((num_slots, 1), rank, dtype=torch.int32)
    scalings, offsets = torch.full((num_slots, 1), 2.0), (0, hidden)
    a2 = torch.randn(num_slots, 2 * rank, hidden, generator=g) * 0.1  # gate/up's A
    ranks2 = torch.full((num_slots, 2), rank, dtype=torch.int32)
    h, h2 = torch.randn(rows, rank, generator=g), torch.empty(rows, 2 * rank)
    x0, res = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    w = torch.rand(hidden, generator=g) + 0.5
    x = x0.clone()

    def torch_norm():
        v = x.add_(res)
        return (v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-6)).mul_(w)

    def unfused():
        lora_cpu.lora_expand(h, b, ranks1, scalings, offsets, batch, x)
        out = cpu_rms_norm(x, w, 1e-6, res)
        lora_cpu.lora_shrink(out, a2, ranks2, batch, h2)
        return out

    def fused():
        return lora_cpu.lora_add_rms_norm(x, res, w, 1e-6, batch,
                                          (h, b, ranks1, scalings, offsets, None),
                                          (a2, ranks2, h2))

    fns = {"torch norm": torch_norm, "C norm": lambda: cpu_rms_norm(x, w, 1e-6, res),
           "unfused": unfused, "fused": fused}
    x.copy_(x0)
    want, want_h2 = unfused(), h2.clone()
    x.copy_(x0)
    torch.testing.assert_close(fused(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2, want_h2, rtol=1e-4, atol=1e-4)
    return flushed_best(fns, repeat, clock, lambda: x.copy_(x0))


def after_gemm(repeat: int, clock) -> dict[str, tuple[float, float]]:
    """(i): per op, (median time right after a GEMM, median time when run again at once)."""
    rows, per, rank, num_slots, hidden = 1024, 128, 16, 32, 1024
    used = random.Random(0).sample(range(num_slots), rows // per)
    batch = LoRABatch.from_token_slots([used[t // per] for t in range(rows)])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, hidden, generator=g)
    w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(5632, hidden, generator=g))
    b = torch.randn(num_slots, hidden, rank, generator=g) * 0.1
    ranks = torch.full((num_slots, 1), rank, dtype=torch.int32)
    scalings, offsets = torch.full((num_slots, 1), 2.0), (0, hidden)
    h, y, one = torch.randn(rows, rank, generator=g), torch.zeros(rows, hidden), torch.zeros(1)
    fns = {"one-element torch add": lambda: one.add_(1.0),
           "C expand, the op": lambda: lora_cpu.lora_expand(h, b, ranks, scalings, offsets,
                                                             batch, y)}
    lib = lora_cpu._native()
    if not isinstance(lib, str):
        fns["C expand, the op"]()  # makes the pool's arguments and the items
        pool, items = lora_cpu._pool_args(b, ranks, scalings, offsets), lora_cpu._work_items(batch)
        args = (lib.sgemm, lib.simd, torch.get_num_threads(), h.data_ptr(), h.stride(0), *pool,
                items.ptr, items.count, y.data_ptr(), y.stride(0))
        fns["C expand, bare C call"] = lambda: lib.expand(*args)
    else:
        del fns["C expand, the op"]
    times = {name: ([], []) for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
            for cold_or_hot in times[name]:
                t = clock()
                fn()
                cold_or_hot.append(clock() - t)
    return {name: (statistics.median(c), statistics.median(hot)) for name, (c, hot) in
            times.items()}


# (h), (j): part -> (its function, the op's key in its results, the rows' labels)
FUSED_PARTS = {
    "h": (gate_up_activation, "act",
          "(h) MLP activation, 1024 x 2816 (gate/up output from memory)",
          "(h) gate/up LoRA expand + activation, 8 adapters x 128 rows (LoRA time: minus the "
          "C activation alone)", "expand, then activation"),
    "j": (add_norm, "norm",
          "(j) residual add + RMSNorm, 1024 x 1024 (input from memory)",
          "(j) o's LoRA expand + add + norm + gate/up's LoRA shrink, 8 adapters x 128 rows "
          "(LoRA time: minus the C norm alone)", "apart"),
}


def fused_parts(args, clock, rows: list, part: str) -> None:
    """Part (h) or (j), if asked for: the C op against torch's ops (``C {op}``,
    ``torch {op}``), then the LoRA time fused into it against ``unfused``."""
    if part not in args.parts:
        return
    if lora_cpu.unavailable_reason() or not lora_cpu._native().simd:
        print(f"({part}) skipped: the C library or AVX-512 is unavailable here", flush=True)
        return
    run, op, base_label, lora_label, apart_label = FUSED_PARTS[part]
    r = run(5 * args.repeat, clock)
    alone, torch_ops = r[f"C {op}"], r[f"torch {op}"]
    rows.append([base_label, f"C {alone * 1e3:.2f} ms", f"torch {torch_ops * 1e3:.2f} ms",
                 f"{torch_ops / alone:.2f}x"])
    rows.append([lora_label, f"fused {r['fused'] * 1e3:.2f} ms (+{(r['fused'] - alone) * 1e3:.2f})",
                 f"{apart_label} {r['unfused'] * 1e3:.2f} ms "
                 f"(+{(r['unfused'] - alone) * 1e3:.2f})",
                 f"{(r['unfused'] - alone) / (r['fused'] - alone):.2f}x"])
    print(rows[-2:], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=8)
    ap.add_argument("--clock", choices=list(CLOCK), default="wall",
                    help="wall time, or the process's CPU time (with --threads 1)")
    ap.add_argument("--parts", default="abcdefghijk", help="which parts to run")
    add_write_docs_flag(ap)
    args = ap.parse_args()
    bench_threads(args.threads)
    clock = CLOCK[args.clock]
    rows = []
    if "a" in args.parts:
        for seqs in (8, 16):
            r = prefill_attention(seqs, 128, 3 * args.repeat, clock)
            rows.append([f"(a) prefill attention, {seqs} x 128 tokens, one layer",
                         f"grouped {r['grouped'] * 1e3:.1f} ms",
                         f"per prompt, kv expanded {r['before'] * 1e3:.1f} ms "
                         f"(per prompt, enable_gqa {r['per prompt'] * 1e3:.1f} ms)",
                         f"{r['before'] / r['grouped']:.2f}x "
                         f"({r['per prompt'] / r['grouped']:.2f}x)"])
            print(rows[-1], flush=True)
    if "b" in args.parts:
        r = decode_attention(32, 150, 8, 3 * args.repeat, clock)
        rows.append(["(b) decode gather + attention, batch 32, 8 layers",
                     f"mask once {r['mask once per step'] * 1e3:.2f} ms",
                     f"bool mask per layer {r['bool mask per layer'] * 1e3:.2f} ms",
                     f"{r['bool mask per layer'] / r['mask once per step']:.2f}x"])
        print(rows[-1], flush=True)
    if "c" in args.parts:
        r = prefill_steps([1024, 2048], args.repeat, clock)
        (t1, f1), (t2, f2) = r["1024-token steps"], r["2048-token steps"]
        rows.append(["(c) prefill 32 x 128 tokens (minor page faults, last run)",
                     f"1024-token steps {t1:.2f} s ({f1})",
                     f"2048-token steps {t2:.2f} s ({f2})", f"{t2 / t1:.2f}x"])
        print(rows[-1], flush=True)
    if "d" in args.parts:
        r = lora_op_overhead(32, 16, 25 * args.repeat, clock)
        rows.append(["(d) LoRA op, gate/up at decode, 32 adapters (per call)",
                     f"bare bmm/add_ {r['bare'] * 1e6:.0f} µs", f"the op {r['op'] * 1e6:.0f} µs",
                     f"{r['op'] / r['bare']:.2f}x"])
        print(rows[-1], flush=True)
    if "e" in args.parts:
        for label, rows_, per in (("decode, 32 rows", 32, 2), ("prefill, 1024 rows", 1024, 128)):
            r = lora_op_vs_gathered(rows_, per, 5 * args.repeat, clock)
            rows.append([f"(e) LoRA ops, one layer's 4 projections, {label}",
                         f"the op {r['op'] * 1e3:.2f} ms",
                         f"gathered A/B + bmm {r['gathered'] * 1e3:.2f} ms",
                         f"{r['gathered'] / r['op']:.2f}x"])
            print(rows[-1], flush=True)
    if "f" in args.parts:
        r = lora_epilogue(5 * args.repeat, clock)
        over = {k: (v - r["base"]) / r["base"] for k, v in r.items()}
        rows.append(["(f) one layer's base GEMMs (+ MLP activation) + LoRA, prefill 1024 "
                     "rows (LoRA time over the base's)",
                     f"torch ops {r['engine'] * 1e3:.1f} ms (+{over['engine']:.1%}); "
                     f"C ops (\"cpu\", the engine's) {r['C ops'] * 1e3:.1f} ms "
                     f"(+{over['C ops']:.1%}); C ops, gate/up expand not fused "
                     f"{r['C ops, unfused'] * 1e3:.1f} ms (+{over['C ops, unfused']:.1%})",
                     f"delta in the GEMM epilogue {r['epilogue'] * 1e3:.1f} ms "
                     f"(+{over['epilogue']:.1%}); LoRA GEMMs on one thread "
                     f"{r['one thread'] * 1e3:.1f} ms (+{over['one thread']:.1%}); base "
                     f"{r['base'] * 1e3:.1f} ms",
                     f"{r['epilogue'] / r['engine']:.2f}x ({r['one thread'] / r['engine']:.2f}x); "
                     f"C ops / torch ops {r['C ops'] / r['engine']:.2f}x"])
        print(rows[-1], flush=True)
    if "g" in args.parts:
        if lora_cpu.unavailable_reason() or not lora_cpu._native().simd:
            print("(g) skipped: the C library or AVX-512 is unavailable here", flush=True)
        else:
            for label, rows_, per in (("decode, 32 rows", 32, 2),
                                      ("prefill, 1024 rows", 1024, 128)):
                r = c_shrink_kernels(rows_, per, 5 * args.repeat, clock)
                rows.append([f"(g) C shrink, one layer's 4 projections, {label}",
                             f"AVX-512 kernel {r['avx512'] * 1e3:.2f} ms",
                             f"BLAS sgemm_ {r['blas'] * 1e3:.2f} ms",
                             f"{r['blas'] / r['avx512']:.2f}x"])
                print(rows[-1], flush=True)
    fused_parts(args, clock, rows, "h")
    if "i" in args.parts:
        for name, (cold, hot) in after_gemm(5 * args.repeat, clock).items():
            rows.append([f"(i) {name}: right after a GEMM / again at once (medians)",
                         f"{cold * 1e3:.3f} ms", f"{hot * 1e3:.3f} ms", f"{hot / cold:.2f}x"])
            print(rows[-1], flush=True)
    fused_parts(args, clock, rows, "j")
    if "k" in args.parts:
        if lora_cpu.unavailable_reason() or not lora_cpu._native().simd:
            print("(k) skipped: the C library or AVX-512 is unavailable here", flush=True)
        else:
            for label, rows_, per, block in (("decode, 32 rows", 32, 2, 32),
                                             ("prefill, 1024 rows", 1024, 128, 1024),
                                             ("prefill, 1024 rows in 32-row calls", 1024, 128,
                                              32)):
                r = c_expand_kernels(rows_, per, block, 5 * args.repeat, clock)
                rows.append([f"(k) C expand, one layer's 4 projections, {label}",
                             f"AVX-512 kernel {r['avx512'] * 1e3:.2f} ms",
                             f"BLAS sgemm_ {r['blas'] * 1e3:.2f} ms",
                             f"{r['blas'] / r['avx512']:.2f}x"])
                print(rows[-1], flush=True)
            r = rotary_ops(5 * args.repeat, clock)
            rows.append(["(k) rotary of q/k, 1024 rows x 20 heads x 64", f"C {r['C'] * 1e3:.2f} ms",
                         f"torch {r['torch'] * 1e3:.2f} ms", f"{r['torch'] / r['C']:.2f}x"])
            print(rows[-1], flush=True)
    table = markdown_table(["what", "new", "before", "before / new"], rows)
    body = (f"CPU float32, {args.threads} threads, {args.clock} clock, the benchmark model's "
            f"shapes (16 heads / 4 kv heads, head dim 64); each pair interleaved in one run, "
            f"best of {3 * args.repeat} ((a), (b)), {args.repeat} ((c)), {25 * args.repeat} "
            f"((d)) or {5 * args.repeat} ((e) to (h), (j), (k); (i): medians). In (d) \"new\" "
            f"is the floor the op's own calls set, \"before\" the op; in (e) and (f) \"before\" is "
            f"the alternative the engine does not take; in (i) \"new\" is the op right after a "
            f"GEMM, \"before\" the same op run again at once.\n\n"
            f"`python benchmarks/bench_cpu_parts.py`\n\n{table}\n")
    report(args, "CPU engine parts", body)


if __name__ == "__main__":
    main()
