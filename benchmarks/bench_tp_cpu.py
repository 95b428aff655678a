"""Tensor parallelism on CPU (gloo): one model step of the ~150M benchmark model at TP=1 and
TP=N side by side, with the time spent in all-reduces and the logits' all-gather.

The model level only (the sharded model, its LoRA buffers and KV cache, a forward under
``forward_context``), so the figure is the sharding's cost, not the process model's: a prefill
of 4 x 128 tokens and a decode step of 32 rows over 128-token contexts, both with rank-16
adapters on all seven projections for three quarters of the rows. TP=1 runs with N threads
and with one, each TP rank with one, every configuration in fresh processes. On a small shared
CPU this is an overhead figure (the all-reduce and gather time), not a speed-up: OpenMP threads
on oversubscribed cores can make the N-thread TP=1 run far slower than its one-thread run.

    python benchmarks/bench_tp_cpu.py [--world 2] [--repeat 5] [--write-docs]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from common import add_write_docs_flag, make_adapters, make_bench_model, markdown_table, report

PROMPTS, PROMPT_LEN, DECODE_ROWS, CONTEXT, BLOCK = 4, 128, 32, 128, 16
NUM_ADAPTERS, RANK = 3, 16


def measure(model_dir: str, adapters: dict[str, str], repeat: int) -> dict[str, float]:
    """Median prefill and decode step times (s) in this process's tensor-parallel state, and
    the collectives' seconds per step."""
    from loraplex.distributed import parallel_state as ps
    from loraplex.kvcache.kv_cache import allocate_kv_cache
    from loraplex.layers.forward_context import ForwardBatch, forward_context
    from loraplex.layers.linear import can_prepack, prepack_linear_weights
    from loraplex.layers.prefill_groups import plan_prefill
    from loraplex.lora.batch import LoRABatchBuilder
    from loraplex.lora.buffers import LoRABuffers
    from loraplex.lora.layers import install_lora_layers
    from loraplex.lora.peft_loader import load_peft_adapter
    from loraplex.models.loader import load_model, load_model_config

    cpu, f32 = torch.device("cpu"), torch.float32
    cfg, _ = load_model_config(model_dir)
    model = load_model(model_dir, cfg, f32, cpu)
    if can_prepack(cpu, f32):
        prepack_linear_weights(model)
    buffers = LoRABuffers(cfg, NUM_ADAPTERS, RANK, f32, cpu)
    max_tokens = PROMPTS * PROMPT_LEN
    install_lora_layers(model, buffers, "torch", max_tokens, f32, cpu)
    for slot, path in enumerate(adapters.values()):
        buffers.write(slot, load_peft_adapter(path, cfg, RANK))
    builder = LoRABatchBuilder(max_tokens, NUM_ADAPTERS, cpu)
    blocks = CONTEXT // BLOCK + 1
    caches = allocate_kv_cache(cfg, DECODE_ROWS * blocks, BLOCK, f32, cpu)
    g = torch.Generator().manual_seed(0)
    i64 = dict(dtype=torch.int64)

    cu = [i * PROMPT_LEN for i in range(PROMPTS + 1)]
    prefill_slots = [-1, *range(NUM_ADAPTERS)][:PROMPTS]
    ids = torch.randint(0, cfg.vocab_size, (cu[-1],), generator=g)
    positions = torch.arange(PROMPT_LEN).repeat(PROMPTS)
    slot_mapping = torch.arange(cu[-1])

    def prefill() -> None:
        batch = ForwardBatch(is_prefill=True, num_tokens=cu[-1], cu_seqlens=cu,
                             prefill_groups=plan_prefill(cu, cpu), slot_mapping=slot_mapping,
                             kv_caches=caches, lora=builder.prepare(prefill_slots,
                                                                    [PROMPT_LEN] * PROMPTS))
        with forward_context(batch):
            model.compute_logits(model(ids, positions)[[c - 1 for c in cu[1:]]])

    rows = DECODE_ROWS
    decode_slots = sorted((r % (NUM_ADAPTERS + 1)) - 1 for r in range(rows))
    tables = torch.arange(rows * blocks, **i64).view(rows, blocks)
    dec_ids = torch.randint(0, cfg.vocab_size, (rows,), generator=g)
    dec_pos = torch.full((rows,), CONTEXT, **i64)
    dec_slots = tables[:, CONTEXT // BLOCK] * BLOCK + CONTEXT % BLOCK

    def decode() -> None:
        batch = ForwardBatch(is_prefill=False, num_tokens=rows, slot_mapping=dec_slots,
                             block_tables=tables, context_lens=dec_pos + 1,
                             max_context_len=CONTEXT + 1, kv_caches=caches,
                             lora=builder.prepare(decode_slots, [1] * rows, is_decode=True))
        with forward_context(batch):
            model.compute_logits(model(dec_ids, dec_pos))

    out = {}
    ps.enable_comm_timing(True)
    with torch.inference_mode():
        for name, step in (("prefill", prefill), ("decode", decode)):
            step()  # warm-up
            ps.reset_comm_stats()
            times = []
            for _ in range(repeat):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
            stats = ps.comm_stats()
            out[name] = statistics.median(times)
            out[f"{name}_reduce"] = stats["all_reduce_seconds"] / repeat
            out[f"{name}_gather"] = stats["all_gather_seconds"] / repeat
            out[f"{name}_reduces"] = stats["all_reduce_calls"] / repeat
    return out


def _rank(rank: int, world: int, threads: int, init: str, model_dir: str, adapters: dict,
          repeat: int, results) -> None:
    torch.set_num_threads(threads)
    from loraplex.distributed import parallel_state as ps

    ps.init_tensor_parallel(rank, world, init, backend="gloo")
    res = measure(model_dir, adapters, repeat)
    buf = io.BytesIO()
    torch.save(res, buf)
    results.put((rank, buf.getvalue()))
    ps.destroy_tensor_parallel()


def measure_tp(world: int, threads: int, model_dir: str, adapters: dict, repeat: int,
               tmp: Path) -> dict:
    """Rank 0's figures (every rank waits for the slowest at each collective), from fresh
    processes (world 1: the unsharded model)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    init = f"file://{tmp / f'tp{world}.init'}"
    procs = [ctx.Process(target=_rank, args=(r, world, threads, init, model_dir, adapters,
                                             repeat, results)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=1800) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
    return torch.load(io.BytesIO(got[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    add_write_docs_flag(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = make_bench_model(root / "model")
        adapters = make_adapters(hf, root, NUM_ADAPTERS, r=RANK)
        del hf
        one = measure_tp(1, args.world, str(root / "model"), adapters, args.repeat, root)
        single = measure_tp(1, 1, str(root / "model"), adapters, args.repeat, root)
        tp = measure_tp(args.world, 1, str(root / "model"), adapters, args.repeat, root)
    rows = []
    for step in ("prefill", "decode"):
        ms = 1000
        rows.append([step, f"{one[step] * ms:.1f}", f"{single[step] * ms:.1f}",
                     f"{tp[step] * ms:.1f}", f"{tp[step] / one[step]:.2f}x",
                     f"{tp[f'{step}_reduce'] * ms:.1f}",
                     f"{int(tp[f'{step}_reduces'])}", f"{tp[f'{step}_gather'] * ms:.2f}"])
    body = markdown_table(
        ["step", f"TP=1 ms ({args.world} threads)", "TP=1 ms (1 thread)",
         f"TP={args.world} ms", f"TP={args.world} / TP=1", "all-reduce ms",
         "all-reduces", "logits all-gather ms"], rows)
    body += (f"\n\n~150M Llama (hidden 1024, 8 layers, 16 heads / 4 kv), float32, "
             f"{NUM_ADAPTERS} rank-{RANK} adapters on all projections for 3/4 of the rows; "
             f"prefill {PROMPTS} x {PROMPT_LEN} tokens, decode {DECODE_ROWS} rows at context "
             f"{CONTEXT}. TP={args.world}: gloo, 1 thread per rank; median of {args.repeat}, "
             f"rank 0's clock; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} "
             f"CPUs. `python {Path(sys.argv[0]).name} --world {args.world}`")
    report(args, "Tensor parallelism (CPU, gloo)", body)


if __name__ == "__main__":
    main()
