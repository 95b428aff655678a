"""Batched LoRA ops on a GPU: check every Triton kernel against the torch reference, then time
them under CUDA graphs next to the projection's base GEMM and its memory floor.

    python benchmarks/bench_lora_ops_gpu.py [--out results.md] [--write-docs] [--no-sweep]
    python benchmarks/bench_lora_ops_gpu.py --dry-run   # CPU: tiny shapes, interpreted kernels

Shapes: Llama-3-8B projections (q/k/v 4096 -> 4096+1024+1024, down 14336 -> 4096), ranks
16/64, 1/8/32/128 decode tokens (one adapter per token up to 32, then round-robin) and a
4096-token prefill (32 adapters x 128 tokens); and lm_head LoRA (4096 -> a 128256-token
vocabulary, Llama 3's) on the rows that get logits: 1 and 32 sampled rows, 512 prompt-logprob
rows (16 per adapter). For the 32-token decode and the prefill, a second table puts DoRA
(column scales in the expand's epilogue) and embedding LoRA (a gather of A's columns over
Llama-3's 128256-token vocabulary, then the expand to hidden 4096) next to plain LoRA on the
same shape. Times are medians of CUDA-graph replays of many
back-to-back calls. "cold" calls rotate over ``--rotate`` disjoint sets of adapter slots so
the adapters are not L2-resident (as in a real forward, where every layer has its own
weights); "hot" reuses one set. The floor is bytes moved (x read, used adapters' A and B read
once, y read and written) over the device-to-device copy bandwidth measured in this run.
Every column is measured by this run; figures from elsewhere (other projects' kernels) are in
docs/benchmarks.md with their provenance. The report is printed; ``--out FILE`` writes it to
FILE, ``--write-docs`` into a section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import DOCS, write_section

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loraplex.ops import lora_ref  # noqa: E402
from loraplex.ops.lora_meta import LoRABatch  # noqa: E402

TOL = 1e-2
DOCS_HEADING = "GPU: LoRA ops, last run of bench_lora_ops_gpu.py"


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    graphs: bool  # CUDA graphs + events; else wall clock (dry run)
    target_ms: float
    bandwidth: float = 0.0  # bytes/s, measured


def sync(env: Env) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)


def time_us(env: Env, fn, rotate: int = 1) -> float:
    """Median time of one ``fn(i)`` call in microseconds. On CUDA: warm up on a side stream,
    capture ``reps`` back-to-back calls (i = 0..reps-1) in one graph, time replays."""
    if not env.graphs:
        fn(0)
        t0 = time.perf_counter()
        for i in range(2):
            fn(i)
        return (time.perf_counter() - t0) / 2 * 1e6
    stream = torch.cuda.Stream(env.device)
    stream.wait_stream(torch.cuda.current_stream(env.device))
    with torch.cuda.stream(stream):
        for i in range(max(3, rotate)):  # compile and load every kernel before capture
            fn(i)
    torch.cuda.current_stream(env.device).wait_stream(stream)
    est = eager_us(env, fn, calls=5)
    reps = max(rotate, min(500, int(env.target_ms * 1000 / max(est, 1.0))))
    reps -= reps % rotate
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    graph.replay()
    sync(env)
    times = []
    for _ in range(15):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / reps)
    del graph
    return statistics.median(times)


def eager_us(env: Env, fn, calls: int = 20) -> float:
    """Mean time per call without CUDA graphs (launch and Python overhead included)."""
    fn(0)
    sync(env)
    t0 = time.perf_counter()
    for i in range(calls):
        fn(i)
    sync(env)
    return (time.perf_counter() - t0) / calls * 1e6


def measure_bandwidth(env: Env) -> float:
    numel = (1 << 29 if env.graphs else 1 << 24) // 2  # 512 MiB on GPU
    src = torch.empty(numel, dtype=torch.bfloat16, device=env.device)
    dst = torch.empty_like(src)
    src.fill_(1.0)
    us = time_us(env, lambda i: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / (us * 1e-6)


@dataclass
class Problem:
    shape: object  # OpShape
    x: torch.Tensor
    a: torch.Tensor  # [rotate * adapters, n*R, in]
    b: torch.Tensor
    ranks: torch.Tensor
    scalings: torch.Tensor
    offsets: tuple[int, ...]
    batches: list[LoRABatch]  # one per disjoint slot set
    h: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor  # base weight [out, in]
    y_base: torch.Tensor


def build_problem(shape, env: Env, rotate: int, seed: int) -> Problem:
    gen = torch.Generator(device=env.device).manual_seed(seed)
    n, r, t, k = len(shape.widths), shape.rank, shape.num_tokens, shape.in_features
    out, slots = sum(shape.widths), shape.num_adapters * rotate

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=env.device) * scale).to(env.dtype)

    base_slots = shape.token_lora_slots()
    return Problem(
        shape, x=randn(t, k), a=randn(slots, n * r, k, scale=k**-0.5),
        b=randn(slots, out, r, scale=r**-0.5),
        ranks=torch.full((slots, n), r, dtype=torch.int32, device=env.device),
        scalings=torch.rand(slots, n, generator=gen, device=env.device) * 1.5 + 0.5,
        offsets=tuple(sum(shape.widths[:i]) for i in range(n + 1)),
        batches=[LoRABatch.from_token_slots([s + j * shape.num_adapters for s in base_slots],
                                            device=env.device) for j in range(rotate)],
        h=torch.zeros(t, n * r, dtype=env.dtype, device=env.device),
        y=randn(t, out), w=randn(out, k, scale=k**-0.5),
        y_base=torch.empty(t, out, dtype=env.dtype, device=env.device),
    )


def check(p: Problem, ops, env: Env, mixed: bool) -> float:
    """Max relative error of shrink and expand vs the reference on fresh inputs, outputs
    NaN-poisoned first. ``mixed``: random ranks 0..R per slice and some no-adapter tokens."""
    gen = torch.Generator(device=env.device).manual_seed(7 + mixed)
    x = torch.randn(p.x.shape, generator=gen, device=env.device).to(env.dtype)
    ranks, batch = p.ranks.clone(), p.batches[0]
    r = p.b.shape[2]
    if mixed:
        ranks = torch.randint(0, r + 1, ranks.shape, generator=gen, device=env.device)
        ranks = ranks.to(torch.int32)
        ranks[0] = r
        group = p.shape.seg_len or 1  # prefill: whole segments without an adapter
        slots = [-1 if (i // group) % 5 == 3 else s
                 for i, s in enumerate(p.shape.token_lora_slots())]
        batch = LoRABatch.from_token_slots(slots, device=env.device)
    h, h_ref = torch.full_like(p.h, float("nan")), torch.full_like(p.h, float("nan"))
    ops.lora_shrink(x, p.a, ranks, batch, h)
    lora_ref.lora_shrink(x, p.a, ranks, batch, h_ref)
    live = ~h_ref.isnan()
    err_h = _rel(h[live], h_ref[live])
    if not torch.equal(h.isnan(), ~live):
        err_h = float("inf")  # wrote outside its ranks/tokens, or left a live entry unwritten
    y0 = torch.randn(p.y.shape, generator=gen, device=env.device).to(env.dtype)
    y, y_ref = y0.clone(), y0.clone()
    ops.lora_expand(h_ref, p.b, ranks, p.scalings, p.offsets, batch, y)
    lora_ref.lora_expand(h_ref, p.b, ranks, p.scalings, p.offsets, batch, y_ref)
    idle = batch.token_lora_slots < 0
    err_y = _rel(y, y_ref) if torch.equal(y[idle], y0[idle]) else float("inf")
    return max(err_h, err_y)


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    if got.numel() == 0:
        return 0.0
    err = (got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)
    return float("inf") if err.isnan() else float(err)


def floor_bytes(p: Problem) -> int:
    s, e = p.shape, p.x.element_size()
    used = len({slot for slot in s.token_lora_slots()})
    n, r, out = len(s.widths), s.rank, sum(s.widths)
    return e * (s.num_tokens * s.in_features + used * r * (n * s.in_features + out)
                + 2 * s.num_tokens * out)


def lora_fns(p: Problem, ops):
    """shrink(i), expand(i), both(i): one call on the i-th (rotating) adapter set."""
    rot = len(p.batches)

    def shrink(i: int) -> None:
        ops.lora_shrink(p.x, p.a, p.ranks, p.batches[i % rot], p.h)

    def expand(i: int) -> None:
        ops.lora_expand(p.h, p.b, p.ranks, p.scalings, p.offsets, p.batches[i % rot], p.y)

    def both(i: int) -> None:
        shrink(i)
        expand(i)

    return shrink, expand, both


def bench_shape(shape, env: Env, ops, rotate: int, seed: int) -> dict:
    p = build_problem(shape, env, rotate, seed)
    err = max(check(p, ops, env, mixed=False), check(p, ops, env, mixed=True))
    shrink, expand, both = lora_fns(p, ops)
    row = {"shape": shape.name, "check": f"{'ok' if err < TOL else 'FAIL'} {err:.1e}",
           "floor": floor_bytes(p) / env.bandwidth * 1e6,
           "base GEMM": time_us(env, lambda i: torch.mm(p.x, p.w.t(), out=p.y_base)),
           "shrink": time_us(env, shrink, rotate), "expand": time_us(env, expand, rotate),
           "LoRA": time_us(env, both, rotate), "LoRA hot": time_us(env, lambda i: both(0)),
           "eager": eager_us(env, both, calls=20 if env.graphs else 2)}
    row["x floor"] = row["LoRA"] / row["floor"]
    row["/ base"] = row["LoRA"] / row["base GEMM"]
    return row


COLUMNS = ["shape", "check", "floor", "base GEMM", "shrink", "expand", "LoRA", "x floor",
           "/ base", "LoRA hot", "eager"]
VARIANT_COLUMNS = ["shape", "variant", "check", "plain LoRA", "variant LoRA", "/ plain"]


def variant_rows(shapes, env: Env, ops, rotate: int, vocab: int) -> list[dict]:
    """DoRA and embedding LoRA next to plain LoRA on the same shape, cold (rotating adapter
    sets), each checked against the reference first. DoRA: the same shrink, and the expand
    with every slot's column scales (``ColumnScales``) applied in its epilogue. Embedding
    (shapes whose output is the hidden size, i.e. ``down``): the gather of A's columns for
    ``vocab`` token ids (``lora_embedding_shrink``) and the expand of B to the hidden size,
    against that shape's plain shrink + expand."""
    return [row for i, shape in enumerate(shapes)
            for row in _variant_shape(shape, env, ops, rotate, vocab, seed=300 + i)]


def _variant_shape(shape, env: Env, ops, rotate: int, vocab: int, seed: int) -> list[dict]:
    from loraplex.ops.lora_embedding import lora_embedding_shrink
    from loraplex.ops.lora_meta import ColumnScales

    rows = []
    p = build_problem(shape, env, rotate, seed)
    gen = torch.Generator(device=env.device).manual_seed(seed + 100)
    slots, out, r = p.b.shape[0], p.b.shape[1], p.b.shape[2]
    plain = time_us(env, lora_fns(p, ops)[2], rotate)
    cs = ColumnScales(torch.rand(slots, out, generator=gen, device=env.device) + 0.5,
                      torch.randn(slots, out, generator=gen, device=env.device) * 0.1,
                      torch.ones(slots, dtype=torch.int32, device=env.device), [True] * slots)
    h_ref = torch.zeros_like(p.h)
    lora_ref.lora_shrink(p.x, p.a, p.ranks, p.batches[0], h_ref)
    y0 = torch.randn(p.y.shape, generator=gen, device=env.device).to(env.dtype)
    y, y_ref = y0.clone(), y0.clone()
    ops.lora_expand(h_ref, p.b, p.ranks, p.scalings, p.offsets, p.batches[0], y, cs)
    lora_ref.lora_expand(h_ref, p.b, p.ranks, p.scalings, p.offsets, p.batches[0], y_ref, cs)
    err = _rel(y, y_ref)

    def dora(j: int) -> None:
        batch = p.batches[j % rotate]
        ops.lora_shrink(p.x, p.a, p.ranks, batch, p.h)
        ops.lora_expand(p.h, p.b, p.ranks, p.scalings, p.offsets, batch, p.y, cs)

    t = time_us(env, dora, rotate)
    rows.append({"shape": shape.name, "variant": "DoRA", "check":
                 f"{'ok' if err < TOL else 'FAIL'} {err:.1e}", "plain LoRA": plain,
                 "variant LoRA": t, "/ plain": t / plain})
    if len(shape.widths) != 1:
        return rows
    ids = torch.randint(0, vocab, (shape.num_tokens,), generator=gen, device=env.device)
    a_emb = (torch.randn(slots, r, vocab, generator=gen, device=env.device)).to(env.dtype)
    ranks1, scal1 = p.ranks[:, :1].contiguous(), p.scalings[:, :1].contiguous()
    h_emb = torch.zeros(shape.num_tokens, r, dtype=env.dtype, device=env.device)
    # the reference: the per-segment gather (ranks on the host), then the torch expand
    h_ref = torch.zeros_like(h_emb)
    lora_embedding_shrink(ids, a_emb, ranks1.cpu(), p.batches[0], h_ref)
    y, y_ref = y0.clone(), y0.clone()
    lora_ref.lora_expand(h_ref, p.b, ranks1, scal1, (0, out), p.batches[0], y_ref)
    lora_embedding_shrink(ids, a_emb, ranks1, p.batches[0], h_emb)
    ops.lora_expand(h_emb, p.b, ranks1, scal1, (0, out), p.batches[0], y)
    err = _rel(y, y_ref)

    def embedding(j: int) -> None:
        batch = p.batches[j % rotate]
        lora_embedding_shrink(ids, a_emb, ranks1, batch, h_emb)
        ops.lora_expand(h_emb, p.b, ranks1, scal1, (0, out), batch, p.y)

    t = time_us(env, embedding, rotate)
    rows.append({"shape": shape.name, "variant": f"embedding (vocab {vocab})", "check":
                 f"{'ok' if err < TOL else 'FAIL'} {err:.1e}", "plain LoRA": plain,
                 "variant LoRA": t, "/ plain": t / plain})
    return rows


def markdown(rows: list[dict], columns: list[str]) -> str:
    def fmt(v) -> str:
        if v is None:
            return "-"
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def sweep_configs(shape, quick: bool) -> dict[str, list[tuple[int, ...]]]:
    """Alternative block sizes per config function of ``lora_triton`` (see its heuristics).
    Shrink: (BLOCK_N, BLOCK_K, split, warps) for decode, (BLOCK_M, BLOCK_N, BLOCK_K, split)
    for prefill; split 1 = no split-K (the first decode pairs and the BLOCK_M 16 prefill tile
    are the configs measured before split-K)."""
    br = min(64, max(4, 1 << (shape.rank - 1).bit_length()))
    nr = len(shape.widths) * shape.rank
    if shape.seg_len is None:
        table = {"_shrink_decode_config": [(2, 2048, 1, 4), (4, 1024, 1, 4), (1, 2048, 1, 4)]
                 + [(2, 2048, s, 4) for s in (2, 4, 7)] + [(2, 1024, 4, 4), (4, 2048, 2, 4),
                                                           (8, 1024, 4, 4), (2, 1024, 7, 8)]
                 + [(16, 512, s, 4) for s in (8, 16)],
                 "_expand_decode_config": [(bn, br) for bn in (64, 128, 256, 512)
                                           if bn * br <= 8192]}
    else:
        bn = min(64, max(16, 1 << (nr - 1).bit_length()))
        table = {"_shrink_segment_config": [(16, bn, 64, 1), (32, bn, 64, 1), (64, bn, 64, 1)]
                 + [(64, bn, 64, s) for s in (2, 3, 5, 8)] + [(32, bn, 64, 3)],
                 "_expand_segment_config": [(64, 128, max(br, 16)), (128, 128, max(br, 16)),
                                            (64, 256, max(br, 16)), (32, 128, max(br, 16))]}
    return {k: v[:2] if quick else v for k, v in table.items()}


def sweep(shapes, env: Env, ops, rotate: int, quick: bool) -> list[dict]:
    """Time shrink+expand (cold) with each config function pinned to one alternative."""
    from loraplex.ops import lora_triton

    rows = []
    for shape in shapes:
        p = build_problem(shape, env, rotate, seed=1)
        both = lora_fns(p, ops)[2]
        for fn_name, configs in sweep_configs(shape, quick).items():
            default = getattr(lora_triton, fn_name)
            for cfg in configs:
                setattr(lora_triton, fn_name, lambda *a, _cfg=cfg: _cfg)
                try:
                    err = check(p, ops, env, mixed=True)
                    us = time_us(env, both, rotate)
                finally:
                    setattr(lora_triton, fn_name, default)
                rows.append({"shape": shape.name, "config": f"{fn_name[1:-7]} {cfg}",
                             "LoRA": us, "check": "ok" if err < TOL else f"FAIL {err:.1e}"})
    return rows


def bench_decode_step(args) -> str:
    """Full decode step of a 4-layer Llama-8B-shaped model, 32 adapters vs base. Returns a
    markdown section; ``main`` prints it and appends it to ``--out``. (``args.dry_run`` is
    set in the CPU dry run, which runs with TRITON_INTERPRET=1.)"""
    import decode_step

    return "\n" + decode_step.run(dry=bool(args.dry_run) or not torch.cuda.is_available())


def lm_head_shapes(ops_shape, ranks, hidden: int, vocab: int, rows=(1, 32), long=(512, 16),
                   adapters: int = 32, dtype=torch.bfloat16) -> list:
    """lm_head LoRA: the logits' rows (one per sampled sequence; ``long``: a chunk's
    prompt-logprob rows, ``long[1]`` per adapter, sorted by adapter), vocabulary-wide B.
    Named "rows", not "decode", so the block-size sweep (decode 32 / prefill 4096 shapes)
    leaves them out."""
    out = []
    for rank in ranks:
        out += [ops_shape(f"lm_head r={rank} rows {t}", hidden, (vocab,), rank, t, adapters,
                          dtype=dtype) for t in rows]
        out.append(ops_shape(f"lm_head r={rank} rows {long[0]}", hidden, (vocab,), rank,
                             long[0], adapters, seg_len=long[1], dtype=dtype))
    return out


def tiny_shapes(ops_shape) -> list:
    """CPU dry run: the same kinds of shapes, small enough for the Triton interpreter."""
    out = lm_head_shapes(ops_shape, (4,), 96, 1000, rows=(1, 6), long=(48, 12), adapters=4,
                         dtype=torch.float32)
    for rank in (4, 8):
        for name, k, widths in (("qkv", 96, (64, 16, 16)), ("down", 160, (48,))):
            out += [ops_shape(f"{name} r={rank} decode {t}", k, widths, rank, t, 4,
                              dtype=torch.float32) for t in (1, 6)]
            out.append(ops_shape(f"{name} r={rank} prefill 48", k, widths, rank, 48, 4,
                                 seg_len=12, dtype=torch.float32))
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, interpreted")
    ap.add_argument("--out", type=Path, default=None, help="also write the report to this file")
    ap.add_argument("--write-docs", nargs="?", type=Path, const=DOCS, default=None,
                    metavar="FILE", help=f"also write the report as the '{DOCS_HEADING}' "
                    f"section of FILE (default: {DOCS})")
    ap.add_argument("--rotate", type=int, default=4, help="disjoint adapter sets (cold runs)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--no-sweep", action="store_true", help="skip the block-size sweep")
    ap.add_argument("--no-compile-check", action="store_true",
                    help="dry run: skip compiling the real-shape launches for sm_90")
    return ap.parse_args(argv)


def compile_check() -> None:
    """Dry run, before the interpreted child: build every real-shape launch for sm_90."""
    print("## Compile check: real-shape launches built for sm_90 (no GPU needed)\n")
    try:
        from loraplex.ops import lora_triton_aot
    except ImportError as e:  # triton without its NVIDIA backend
        print(f"skipped: {e}")
        return
    lora_triton_aot.main()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dry = args.dry_run or not torch.cuda.is_available()
    if dry and os.environ.get("TRITON_INTERPRET") != "1":
        if not args.no_compile_check:
            compile_check()
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.run([*child, "--dry-run"], env=env, check=False).returncode

    from loraplex.ops import lora_triton as ops
    from loraplex.ops.lora_triton_aot import OpShape, target_shapes

    torch.manual_seed(0)
    if dry:
        env = Env(torch.device("cpu"), torch.float32, graphs=False, target_ms=0)
        shapes, rotate, device_name = tiny_shapes(OpShape), 2, "CPU (Triton interpreter)"
        torch.set_num_threads(1)
    else:
        env = Env(torch.device("cuda"), torch.bfloat16, graphs=True, target_ms=5.0)
        shapes = target_shapes(tuple(args.ranks), tuple(args.tokens))
        shapes += lm_head_shapes(OpShape, tuple(args.ranks), 4096, 128256)
        rotate, device_name = args.rotate, torch.cuda.get_device_name()
    env.bandwidth = measure_bandwidth(env)
    head = (f"# LoRA ops: {device_name}, {str(env.dtype)[6:]}, copy bandwidth "
            f"{env.bandwidth / 1e9:.0f} GB/s, {'CUDA graphs' if env.graphs else 'wall clock'}, "
            f"times in us (LoRA = shrink+expand; cold = {rotate} rotating adapter sets)\n")
    print(head)
    rows = []
    for i, shape in enumerate(shapes):
        rows.append(bench_shape(shape, env, ops, rotate, seed=100 + i))
        print(f"{shape.name:26s} " + "  ".join(
            f"{c}={rows[-1][c]:.3g}" if isinstance(rows[-1][c], float) else f"{c}={rows[-1][c]}"
            for c in COLUMNS[1:] if rows[-1].get(c) is not None), flush=True)
    report = head + "\n" + markdown(rows, COLUMNS) + "\n"
    print("\n" + report)
    if args.out:
        args.out.write_text(report)
    failed = any(not r["check"].startswith("ok") for r in rows)
    ends = (" decode 6", " prefill 48") if dry else (" decode 32", " prefill 4096")
    vrows = variant_rows([s for s in shapes if s.name.endswith(ends)], env, ops, rotate,
                         vocab=512 if dry else 128256)  # Llama-3's vocabulary
    failed |= any(not r["check"].startswith("ok") for r in vrows)
    table = ("\n## DoRA and embedding LoRA vs plain LoRA (cold, us)\n\n"
             + markdown(vrows, VARIANT_COLUMNS) + "\n")
    print(table)
    report += table
    if args.out:
        args.out.write_text(report)
    if not args.no_sweep:
        picks = [s for s in shapes if s.name.endswith((" decode 32", " prefill 4096"))]
        if dry:
            picks = [s for s in shapes if s.rank == 4 and s.name.startswith("qkv")][1:]
        srows = sweep(picks, env, ops, rotate, quick=dry)
        failed |= any(r["check"] != "ok" for r in srows)
        table = "\n## Block-size sweep (LoRA, cold)\n\n" + markdown(
            srows, ["shape", "config", "LoRA", "check"]) + "\n"
        print(table)
        report += table
        if args.out:
            args.out.write_text(report)
    section = bench_decode_step(args)
    print(section)
    report += section
    if args.out:
        args.out.write_text(report)
    if args.write_docs is not None:
        # one section: the report's own headings move below the section's
        body = "\n".join("### " + ln.lstrip("#").strip() if ln.startswith("#") else ln
                         for ln in report.splitlines())
        write_section(args.write_docs, DOCS_HEADING, body)
        print(f"written to {args.write_docs}")
    if failed:
        print("\nFAILED: a kernel disagrees with the reference (see 'check')")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
