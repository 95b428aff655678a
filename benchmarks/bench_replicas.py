"""Replicas on Ray Serve: throughput at 1 vs 2 CPU replicas, adapter-aware vs blind routing.

A local Ray cluster serves a random Llama (``--small``: a ~5M-parameter one that 2 shared
cores can run in minutes; default: the ~150M CPU benchmark model, see common.py) with
``--num-adapters`` random rank-``--rank`` PEFT adapters, at most ``--max-loras-per-replica``
resident per replica. A closed-loop client keeps ``--concurrency`` non-streaming
``/v1/completions`` requests in flight; each request's adapter is drawn from a Zipf law
(exponent ``--zipf``, fixed seed) over the adapters, so a few are hot and most are cold.

Three setups, one after another on the same cluster and the same request list:
1 replica; 2 replicas with multiplexed routing (Ray sends an adapter's requests to a
replica that holds it); 2 replicas with blind routing (no model id: Ray's default choice by
queue length). Adapter loads per replica are read from the ``x-loraplex-replica-adapter-loads``
header (each replica's running count). Each replica gets ``--cpus-per-replica`` Ray CPUs and
one torch thread.

    python benchmarks/bench_replicas.py --small [--num-requests 256] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_write_docs_flag, make_adapters, make_bench_model, markdown_table, report  # noqa: E402

SMALL = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=688, vocab_size=4000)


def zipf_choices(n_items: int, n: int, s: float, seed: int) -> list[int]:
    """``n`` draws from P(i) proportional to 1 / (i + 1) ** s over ``n_items`` items."""
    weights = [1 / (i + 1) ** s for i in range(n_items)]
    return random.Random(seed).choices(range(n_items), weights=weights, k=n)


async def run_load(url: str, jobs: list[tuple[str, list[int]]], output_len: int,
                   concurrency: int) -> dict:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    loads: defaultdict[str, int] = defaultdict(int)
    served: Counter[str] = Counter()
    homes: defaultdict[str, Counter[str]] = defaultdict(Counter)
    tokens = 0

    async with httpx.AsyncClient(timeout=1800) as client:
        async def one(model: str, prompt: list[int]) -> None:
            nonlocal tokens
            async with sem:
                r = await client.post(f"{url}/v1/completions", json={
                    "model": model, "prompt": prompt, "max_tokens": output_len,
                    "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            replica = r.headers["x-loraplex-replica"]
            loads[replica] = max(loads[replica], int(r.headers["x-loraplex-replica-adapter-loads"]))
            served[replica] += 1
            homes[model][replica] += 1
            tokens += r.json()["usage"]["completion_tokens"]

        t = time.perf_counter()
        await asyncio.gather(*(one(m, p) for m, p in jobs))
        wall = time.perf_counter() - t
    # share of each adapter's requests served by its most-used replica
    affinity = sum(max(c.values()) for c in homes.values()) / len(jobs)
    return {"wall": wall, "tokens": tokens, "loads": dict(loads), "served": dict(served),
            "affinity": affinity}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", action="store_true", help="a ~5M-parameter model (2-core CPUs)")
    ap.add_argument("--num-adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--max-loras-per-replica", type=int, default=8)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.1)
    ap.add_argument("--cpus-per-replica", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    add_write_docs_flag(ap)
    args = ap.parse_args()

    import ray
    from ray import serve

    from loraplex.serve_ray.app import build_app
    from loraplex.serve_ray.config import RayServeConfig

    tmp = Path(tempfile.mkdtemp(prefix="loraplex-bench-replicas-"))
    hf = make_bench_model(tmp / "model", **(SMALL if args.small else {}))
    adapters = make_adapters(hf, tmp, args.num_adapters, r=args.rank)
    vocab = hf.config.vocab_size
    del hf
    rng = random.Random(args.seed)
    names = list(adapters)
    jobs = [(names[i], [rng.randrange(3, vocab) for _ in range(args.input_len)])
            for i in zipf_choices(len(names), args.num_requests, args.zipf, args.seed)]
    hot = Counter(m for m, _ in jobs)

    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2 * args.cpus_per_replica, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "LORAPLEX_NUM_THREADS": "1",
                                       "PYTHONPATH": root}})
    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    url = "http://127.0.0.1:8123"
    rows = []
    try:
        for replicas, routing in [(1, "multiplexed"), (2, "multiplexed"), (2, "blind")]:
            config = RayServeConfig(
                model=str(tmp / "model"), adapters=adapters, served_model_name="base",
                replicas=replicas, num_cpus_per_replica=args.cpus_per_replica,
                max_loras_per_replica=args.max_loras_per_replica, routing=routing,
                engine_args=dict(device="cpu", max_lora_rank=args.rank, max_num_seqs=32,
                                 max_loras_per_batch=args.max_loras_per_replica))
            serve.run(build_app(config), name="bench", route_prefix="/")
            asyncio.run(run_load(url, [("base", jobs[0][1])] * 4, 2, 4))  # warm up
            print(f"{replicas} replica(s), {routing} routing ...", flush=True)
            res = asyncio.run(run_load(url, jobs, args.output_len, args.concurrency))
            serve.delete("bench")
            loads = sorted(res["loads"].values(), reverse=True)
            rows.append([replicas, routing, f"{res['wall']:.1f}",
                         f"{len(jobs) / res['wall']:.2f}", f"{res['tokens'] / res['wall']:.1f}",
                         " + ".join(map(str, loads)), sum(loads),
                         " / ".join(map(str, sorted(res["served"].values(), reverse=True))),
                         f"{100 * res['affinity']:.0f}%"])
            print(rows[-1], flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    base = float(rows[0][3])
    for row in rows:
        row.insert(5, f"{float(row[3]) / base:.2f}x")
    table = markdown_table(
        ["replicas", "routing", "wall s", "req/s", "out tok/s", "vs 1 replica",
         "adapter loads per replica", "total loads", "requests per replica",
         "same-replica share"], rows)
    shape = "~5M-parameter (--small)" if args.small else "~150M-parameter"
    body = (f"{table}\n\n{len(jobs)} requests ({args.input_len} prompt + {args.output_len} "
            f"output tokens), {args.concurrency} in flight, {args.num_adapters} rank-{args.rank} "
            f"adapters with Zipf({args.zipf}) popularity (the hottest adapter gets "
            f"{hot.most_common(1)[0][1]} requests, {len(hot)} adapters are used), at most "
            f"{args.max_loras_per_replica} resident per replica; {shape} random Llama, one "
            f"torch thread and {args.cpus_per_replica:g} Ray CPU per replica, "
            f"on {os.cpu_count()} CPU cores. 'same-replica share': requests served by the "
            f"replica that served most of their adapter's requests. Command: "
            f"`python benchmarks/bench_replicas.py{' --small' if args.small else ''}`.")
    report(args, "Replicas on Ray Serve", body)


if __name__ == "__main__":
    main()
