"""Tensor parallelism on CPU (gloo): engine step time at TP=1 vs TP=2, prefill and decode, with
the time each rank spends in collectives.

The 150M-parameter benchmark Llama (``common.BENCH_SHAPE``), a batch of prompts spread over
rank-16 adapters on all seven projections and the base model. Each configuration gets the
same cores: TP=1 runs on ``--threads`` threads, TP=2 on ``--threads / 2`` per rank. On one
small CPU this is a correctness-and-overhead figure, not a speed-up: the ranks share the
cores, and every step pays the control broadcasts and 2 all-reduces per layer.

Measured per configuration: the prefill step (every prompt whole, one step), the median
decode step, and per rank the all-reduce and all-gather seconds in them (timed with
``parallel_state.enable_comm_timing``: time blocked in the collective, waiting for the
slower rank included). ``--dry-run``: tiny shapes, one repetition (a smoke test).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_write_docs_flag,
    make_adapters,
    make_bench_model,
    markdown_table,
    report,
)

TINY = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=256, vocab_size=512)


def measure(model_dir: str, adapters: dict[str, str], tp: int, args) -> dict:
    import torch

    from loraplex import SamplingParams
    from loraplex.distributed.parallel_state import (
        comm_stats,
        enable_comm_timing,
        reset_comm_stats,
    )
    from loraplex.engine.llm_engine import LLMEngine

    torch.set_num_threads(args.threads)  # the engine gives each rank threads / tp
    budget = args.batch * args.prompt_len
    engine = LLMEngine.from_args(
        model_dir, adapters=adapters, device="cpu", tensor_parallel_size=tp,
        max_num_batched_tokens=budget, max_num_seqs=args.batch, num_kv_blocks=
        args.batch * (-(-(args.prompt_len + args.decode_steps + 2) // 16)) + 8,
        enable_prefix_caching=False, max_loras_per_batch=len(adapters))
    names = [*adapters, None]
    executor = engine.tp_peer

    def stats(enable: bool | None = None) -> list[dict]:
        """Every rank's collective stats since the last call (then reset)."""
        if executor is None:
            out = [comm_stats()]
            if enable is not None:
                enable_comm_timing(enable)
            reset_comm_stats()
            return out
        return executor.comm_stats(enable, reset=True)

    stats(enable=True)
    prefill, decode = [], []
    prefill_comm, decode_comm = [], []
    try:
        for rep in range(args.repeat + 1):  # the first round warms up
            sp = SamplingParams(max_tokens=args.decode_steps + 1, temperature=0.0,
                                ignore_eos=True)
            for i in range(args.batch):
                prompt = [(7 * i + 13 * j + rep) % 500 + 3 for j in range(args.prompt_len)]
                engine.add_request(f"r{rep}-{i}", prompt, sp, names[i % len(names)])
            stats()
            t = time.perf_counter()
            engine.step()
            dt = time.perf_counter() - t
            comm = stats()
            steps = []
            for _ in range(args.decode_steps):
                t = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - t)
            dcomm = stats()
            while engine.has_unfinished_requests():
                engine.step()
            if rep == 0:
                continue
            prefill.append(dt)
            prefill_comm.append(comm)
            decode.append(statistics.median(steps))
            decode_comm.append([{k: v / args.decode_steps for k, v in r.items()} for r in dcomm])
    finally:
        engine.close()
    best = min(range(len(prefill)), key=prefill.__getitem__)
    mid = sorted(range(len(decode)), key=decode.__getitem__)[len(decode) // 2]
    return {"prefill": prefill[best], "prefill_comm": prefill_comm[best],
            "decode": decode[mid], "decode_comm": decode_comm[mid]}


def comm_cell(ranks: list[dict]) -> str:
    """Per rank: all-reduce ms (calls) + all-gather ms."""
    return " / ".join(
        f"{1e3 * r['all_reduce_seconds']:.1f} ({r['all_reduce_calls']:.0f}) + "
        f"{1e3 * r['all_gather_seconds']:.1f}" for r in ranks)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="cores per configuration")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes, one repetition")
    add_write_docs_flag(ap)
    args = ap.parse_args()
    if args.dry_run:
        args.batch, args.prompt_len, args.decode_steps, args.repeat = 2, 16, 3, 1
        args.adapters = 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = make_bench_model(root / "model", **(TINY if args.dry_run else {}))
        adapters = make_adapters(hf, root, args.adapters)
        del hf
        results = {tp: measure(str(root / "model"), adapters, tp, args) for tp in (1, 2)}
    base = results[1]
    rows = []
    for tp, r in results.items():
        rows.append([f"TP={tp}", f"{1e3 * r['prefill']:.1f}",
                     f"{r['prefill'] / base['prefill']:.2f}x", comm_cell(r["prefill_comm"]),
                     f"{1e3 * r['decode']:.1f}", f"{r['decode'] / base['decode']:.2f}x",
                     comm_cell(r["decode_comm"])])
    table = markdown_table(
        ["", "prefill step ms", "vs TP=1", "prefill comm ms per rank",
         "decode step ms", "vs TP=1", "decode comm ms per rank"], rows)
    shape = "tiny (dry run)" if args.dry_run else "150M Llama (hidden 1024, 8 layers)"
    body = (f"{shape}, CPU, gloo, {args.threads} cores per configuration (TP=2: "
            f"{max(1, args.threads // 2)} thread per rank); {args.batch} requests of "
            f"{args.prompt_len} prompt tokens over {args.adapters} rank-16 adapters and the "
            f"base model; prefill = the step that runs every prompt whole (best of "
            f"{args.repeat}), decode = median step of {args.decode_steps}. Comm: per rank, "
            f"all-reduce ms (calls) + all-gather ms within that step, blocked time included "
            f"(a rank that arrives first waits for the other).\n\n{table}")
    report(args, "Tensor parallelism on CPU (bench_tp.py)", body)


if __name__ == "__main__":
    main()
