"""Decode step of Llama-3.2-1B / Llama-3.1-8B shaped random models (bf16, GPU): the loraplex
engine against its memory floor and against transformers / PEFT, side by side in one run.

For each point (batch x context x sampler x base / 32 rank-16 adapters on all seven
projections, requests spread over the 32): the median wall time of one ``engine.step()``
(CUDA graphs, Triton LoRA ops, sampling included), the floor = (weights + the KV this step
reads at its real context + the adapters it touches) / the device-to-device copy bandwidth
measured in the same run, step / floor, and one decode step of a transformers
``LlamaForCausalLM`` (``DynamicCache`` of the same context; PEFT ``adapter_names`` for the
mixed rows) sharing the engine model's weight storage. Checks: a step at a fixed context
under ``max_model_len`` 4096 vs 32768, 32 adapters / base and top-p / greedy at batch 64.

Sequences are made to look prefilled (blocks allocated over a KV cache of random values) so
no prefill runs: the whole default run is sized for ~4 minutes on an H200; ``--full`` is
the whole grid, ``--time-limit`` skips what would run past it. ``--dry-run``: tiny shapes on
CPU, same code path. Usage: ``python benchmarks/bench_decode_gpu.py [--dry-run] [--full]
[--shapes 1b 8b] [--batches ...] [--contexts ...] [--no-hf] [--out F] [--write-docs]``.
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode_hf  # noqa: E402
from common import markdown_table, write_section  # noqa: E402
from decode_engine import (  # noqa: E402
    build_engine,
    build_model,
    model_config,
    random_adapters,
    time_engine_steps,
)

SHAPES = {  # layers, hidden, intermediate, heads, kv heads, head_dim, vocab, tied embeddings
    "1b": (16, 2048, 8192, 32, 8, 64, 128256, True),
    "8b": (32, 4096, 14336, 32, 8, 128, 128256, False),
    "tiny": (2, 64, 128, 4, 2, 16, 512, True),
}
N_ADAPTERS, RANK = 32, 16
SAMPLERS = ("greedy", "top-p")
DOCS_HEADING = "GPU: decode step vs memory floor and transformers (bench_decode_gpu.py)"


@dataclass
class Env:
    device: torch.device
    dtype: torch.dtype
    bandwidth: float  # bytes/s, device-to-device copy
    steps: int
    deadline: float
    skipped: list[str]

    def time_left(self, what: str) -> bool:
        if time.monotonic() < self.deadline:
            return True
        self.skipped.append(what)
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of ``dst.copy_(src)`` (read + write), median of 10 copies of 1 GiB (CPU: 64 MiB)."""
    n = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.ones(n // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n / statistics.median(times[2:])


def grid(args) -> list[tuple[int, int, str]]:
    """(batch, context, sampler) points; the top-p sampler only at ``--check-batch`` unless
    ``--full``; contexts above 2048 only for batches <= 8."""
    pts = []
    for b in args.batches:
        for c in args.contexts:
            if c > 2048 and b > 8 and not args.dry_run:
                continue
            for s in SAMPLERS:
                if s == "greedy" or args.full or b == args.check_batch:
                    pts.append((b, c, s))
    return pts


def floor_bytes(cfg, weight_bytes: int, batch: int, context: int, n_adapters: int,
                itemsize: int) -> int:
    kv = batch * context * 2 * cfg.num_layers * cfg.kv_size * itemsize
    per_adapter = cfg.num_layers * RANK * itemsize * sum(
        fin + fout for fin, fout in cfg.proj_shapes().values())
    return weight_bytes + kv + min(n_adapters, batch) * per_adapter


def adapters_label(batch: int, mixed: bool) -> str:
    return f"{min(batch, N_ADAPTERS)} x r{RANK}" if mixed else "base"  # distinct in the batch


def adapter_mix(batch: int, mixed: bool) -> list[str | None]:
    return [f"lora{i % N_ADAPTERS}" if mixed else None for i in range(batch)]


def bench_shape(name: str, args, env: Env) -> tuple[list[list], list[list]]:
    """Rows of the main table and of the checks table for one model shape."""
    points = grid(args)
    longest = max(c for _, c, _ in points)
    cfg = model_config(SHAPES[name], max_position=65536)
    t0 = time.monotonic()
    model = build_model(cfg, env.device, env.dtype)
    adapters = random_adapters(cfg, N_ADAPTERS, RANK, env.device, env.dtype)
    itemsize = torch.empty((), dtype=env.dtype).element_size()
    # the embedding table is gathered (a few rows), not read, unless it is also the lm_head
    weight_bytes = sum(p.nbytes for n, p in model.named_parameters()
                       if cfg.tie_word_embeddings or n != "model.embed_tokens.weight")
    views = decode_hf.weight_views(model, cfg) if not args.no_hf else None
    margin = 4 * env.steps + 16
    blocks = max(b * -(-(c + margin) // 16) for b, c, _ in points)
    engine = build_engine(model, cfg, env.device, env.dtype, adapters, RANK,
                          max_num_seqs=max(args.batches), max_model_len=longest + margin,
                          num_blocks=blocks)
    print(f"[{name}] model + {N_ADAPTERS} adapters + engine in {time.monotonic() - t0:.1f} s",
          flush=True)
    rows, results = [], {}
    for b, c, s in points:
        for mixed in (False, True):
            label = f"{name} b={b} ctx={c} {s} {'mixed' if mixed else 'base'}"
            if not env.time_left(label):
                continue
            step = time_engine_steps(engine, b, c, s == "greedy", adapter_mix(b, mixed),
                                     env.steps)
            fl = floor_bytes(cfg, weight_bytes, b, c, N_ADAPTERS if mixed else 0, itemsize)
            results[(b, c, s, mixed)] = step
            rows.append([name, b, c, s, adapters_label(b, mixed),
                         step * 1e3, fl / env.bandwidth * 1e3, step * env.bandwidth / fl])
            print(f"  {label}: {step * 1e3:.3f} ms, {rows[-1][-1]:.2f}x floor", flush=True)
    del engine
    free_device(env.device)
    checks = _checks(name, model, cfg, adapters, args, env, results)
    hf = _hf_rows(name, model, cfg, views, points, env) if views is not None else {}
    for row in rows:
        got = hf.get(tuple(row[1:5]))
        row += [got * 1e3, got * 1e3 / row[5]] if got is not None else ["-", "-"]
    del model, adapters, views
    free_device(env.device)
    return rows, checks


def _checks(name, model, cfg, adapters, args, env: Env, results) -> list[list]:
    b, out = args.check_batch, []
    for c in args.contexts:
        base = results.get((b, c, "greedy", False))
        mixed = results.get((b, c, "greedy", True))
        topp = results.get((b, c, "top-p", False))
        if base and mixed:
            out.append([name, f"{min(b, N_ADAPTERS)} adapters / base, batch {b}, context {c}",
                        f"{mixed * 1e3:.3f} / {base * 1e3:.3f} ms", mixed / base])
        if base and topp:
            out.append([name, f"top-p / greedy, batch {b}, context {c}",
                        f"{topp * 1e3:.3f} / {base * 1e3:.3f} ms", topp / base])
    cb, cc = (4, 64) if args.dry_run else (8, 2048)
    times = {}
    for max_len in (4096, 32768):
        if not env.time_left(f"{name} max_model_len={max_len} check"):
            return out
        engine = build_engine(model, cfg, env.device, env.dtype, adapters[:1], RANK,
                              max_num_seqs=cb, max_model_len=max_len,
                              num_blocks=cb * -(-(cc + 4 * env.steps + 16) // 16))
        times[max_len] = time_engine_steps(engine, cb, cc, True, [None] * cb, env.steps)
        del engine
        free_device(env.device)
    out.append([name, f"max_model_len 32768 / 4096, batch {cb}, context {cc}",
                f"{times[32768] * 1e3:.3f} / {times[4096] * 1e3:.3f} ms",
                times[32768] / times[4096]])
    return out


def _hf_rows(name, model, cfg, views, points, env: Env) -> dict:
    """(batch, context, sampler, adapters column) -> seconds of one HF / PEFT decode step."""
    out = {}
    model_hf = decode_hf.build_hf(cfg, views, env.device)
    for mixed in (False, True):
        if mixed:
            if not env.time_left(f"{name} PEFT adapters"):
                break
            model_hf = decode_hf.add_peft_adapters(model_hf, N_ADAPTERS, RANK, env.dtype)
        for b, c in dict.fromkeys((b, c) for b, c, _ in points):
            if not env.time_left(f"{name} HF b={b} ctx={c} {'PEFT' if mixed else 'base'}"):
                continue
            cache = decode_hf.random_cache(cfg, b, c, env.device, env.dtype)
            names = ([f"lora{i % N_ADAPTERS}" for i in range(b)] if mixed else None)
            for s in [s for bb, cc, s in points if (bb, cc) == (b, c)]:
                step = functools.partial(decode_hf.decode_step, model_hf, cache, c, b,
                                         s == "greedy", names, env.device)
                out[(b, c, s, adapters_label(b, mixed))] = median_time(
                    step, env.device, warmup=2, reps=max(3, env.steps // 2))
            del cache
            free_device(env.device)
    del model_hf
    free_device(env.device)
    return out


def median_time(fn, device: torch.device, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def free_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, whole code path")
    ap.add_argument("--full", action="store_true",
                    help="batches 1 8 64 256, contexts 256 2048 8192, both samplers everywhere")
    ap.add_argument("--shapes", nargs="+", choices=["1b", "8b"], default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--contexts", type=int, nargs="+", default=None)
    ap.add_argument("--check-batch", type=int, default=None,
                    help="batch of the top-p and 32-adapter checks (default 64; dry run 4)")
    ap.add_argument("--steps", type=int, default=None, help="timed engine steps per point")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers / PEFT")
    ap.add_argument("--time-limit", type=float, default=270.0,
                    help="seconds; points that would start later are skipped and listed")
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    ap.add_argument("--write-docs", action="store_true",
                    help=f"replace the '{DOCS_HEADING}' section of docs/benchmarks.md")
    args = ap.parse_args(argv)
    dry = args.dry_run
    args.shapes = ["tiny"] if dry else (args.shapes or ["1b", "8b"])
    default_batches = [1, 8, 64, 256] if args.full else [1, 8, 64]
    default_contexts = [256, 2048, 8192] if args.full else [256, 2048]
    args.batches = args.batches or ([1, 4] if dry else default_batches)
    args.contexts = args.contexts or ([16, 64] if dry else default_contexts)
    args.check_batch = args.check_batch or (4 if dry else 64)
    args.steps = args.steps or (3 if dry else 10)
    for name in ("batches", "contexts"):
        if any(v < 1 for v in getattr(args, name)):
            ap.error(f"--{name} must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    if args.dry_run:
        torch.set_num_threads(1)  # tiny ops: threads only add sync (30x slower on a busy host)
    env = Env(device, dtype, copy_bandwidth(device), args.steps,
              time.monotonic() + args.time_limit, [])
    dev_name = "CPU dry run, tiny shapes" if args.dry_run else torch.cuda.get_device_name()
    path = ("static-buffer decode path run eagerly, torch LoRA" if args.dry_run
            else "CUDA graphs, Triton LoRA")
    rows, checks, failed = [], [], []
    end = env.deadline
    for k, name in enumerate(args.shapes):
        gc.collect()  # a failed shape's frames (and their device tensors) are garbage now
        free_device(device)
        # each shape gets an equal share of what is left, so a slow first shape cannot
        # crowd the second out entirely
        env.deadline = time.monotonic() + (end - time.monotonic()) / (len(args.shapes) - k)
        try:
            r, c = bench_shape(name, args, env)
        except Exception as e:  # keep the other shape's numbers: device time is scarce
            traceback.print_exc()
            failed.append(f"{name}: {type(e).__name__}: {e}")
            continue
        rows += r
        checks += c
    header = ["shape", "batch", "context", "sampler", "adapters", "engine ms", "floor ms",
              "step / floor", "HF ms", "HF / engine"]
    report = (
        f"Measured on {dev_name} ({str(dtype)[6:]}, torch {torch.__version__}), copy "
        f"bandwidth {env.bandwidth / 1e9:.0f} GB/s, {args.steps} timed steps per point "
        f"(median). engine = one `engine.step()` ({path}, sampling); floor = "
        f"(weights + KV at the real context + adapters touched) / copy bandwidth; HF = one "
        f"transformers decode step (DynamicCache, PEFT `adapter_names` for adapter rows).\n\n"
        + markdown_table(header, [[fmt(v) for v in r] for r in rows])
        + "\n\nChecks (ratios near 1 are the goal):\n\n"
        + markdown_table(["shape", "check", "times", "ratio"], [[fmt(v) for v in r]
                                                               for r in checks])
        + "\n")
    if env.skipped:
        report += f"\nSkipped past --time-limit {args.time_limit:.0f} s: " \
                  f"{', '.join(env.skipped)}\n"
    if failed:
        report += "\nFailed: " + "; ".join(failed) + "\n"
    print("\n" + report)
    if args.out:
        args.out.write_text(report)
    if args.write_docs:
        if args.dry_run:
            print("--write-docs ignored on a dry run", file=sys.stderr)
        else:
            write_section(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md",
                          DOCS_HEADING, report)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
