"""Serving benchmark: an open-loop client against a loraplex server over HTTP.

Requests arrive as a Poisson process (fixed seed) at ``--request-rate`` whether or not earlier
ones finished, each a streaming ``/v1/completions`` call with a random token-id prompt and a
fixed number of output tokens (``ignore_eos``), for an adapter drawn uniformly from the
server's adapters (``--base-fraction`` of requests go to the base model). The server is
started on the CPU benchmark model (random Llama, ~150M parameters, see common.py) with
``--num-adapters`` random rank-16 PEFT adapters, all created in a temp dir, unless
``--base-url`` points at a running server.

    python benchmarks/bench_serving.py [--request-rate 1] [--num-requests 64] [--small]
    python benchmarks/bench_serving.py --adapter-load-stall   # in-process, prints only
    python benchmarks/bench_serving.py --scenarios   # scheduler scenarios (a), (b), (c)

Measures requests/s, output tokens/s, p50/p99 time to first token, inter-token latency (gap
between streamed chunks) and end-to-end latency; prints a markdown table, and with
``--write-docs`` writes it to docs/benchmarks.md under "## Serving" (that section only is
replaced).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from common import add_write_docs_flag, make_adapters, make_bench_model, markdown_table, report

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)
    output_tokens: int = 0


async def one_request(http: httpx.AsyncClient, url: str, body: dict) -> Result:
    res = Result()
    start = last = time.perf_counter()
    try:
        async with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    res.error = event["error"]["message"]
                    return res
                if event.get("usage"):
                    res.output_tokens = event["usage"]["completion_tokens"]
                if any(c.get("text") for c in event.get("choices", [])):
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {exc}"
        return res
    res.latency = time.perf_counter() - start
    res.ok = True
    return res


async def run_load(base_url: str, models: list[str], args) -> tuple[list[Result], float]:
    """Send ``args.num_requests`` requests with exponential inter-arrival gaps."""
    rng = random.Random(args.seed)
    bodies, arrivals, t = [], [], 0.0
    for _ in range(args.num_requests):
        base = rng.random() < args.base_fraction
        bodies.append({
            "model": models[0] if base else rng.choice(models[1:]),
            "prompt": [rng.randrange(3, args.vocab_size) for _ in range(args.input_len)],
            "max_tokens": args.output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
        })
        arrivals.append(t)
        if math.isfinite(args.request_rate):
            t += rng.expovariate(args.request_rate)
    limits = httpx.Limits(max_connections=args.num_requests + 8)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as http:
        url = f"{base_url}/v1/completions"
        await one_request(http, url, {**bodies[0], "max_tokens": 2})  # warm up
        t0 = time.perf_counter()

        async def fire(at: float, body: dict) -> Result:
            await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
            return await one_request(http, url, body)

        results = await asyncio.gather(*(fire(a, b) for a, b in zip(arrivals, bodies)))
        return list(results), time.perf_counter() - t0


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation), NaN when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[Result], duration: float) -> list[list[str]]:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    ttft = [r.ttft * 1e3 for r in ok]
    itl = [x * 1e3 for r in ok for x in r.itls]
    e2e = [r.latency for r in ok]
    return [
        ["completed / failed", f"{len(ok)} / {len(results) - len(ok)}"],
        ["duration (s)", f"{duration:.1f}"],
        ["throughput (req/s)", f"{len(ok) / duration:.2f}"],
        ["output tokens/s", f"{out_tokens / duration:.1f}"],
        ["TTFT p50 / p99 (ms)", f"{pct(ttft, 50):.0f} / {pct(ttft, 99):.0f}"],
        ["inter-token latency p50 / p99 (ms)", f"{pct(itl, 50):.1f} / {pct(itl, 99):.1f}"],
        ["end-to-end latency p50 / p99 (s)", f"{pct(e2e, 50):.2f} / {pct(e2e, 99):.2f}"],
    ]


def server_counters(base_url: str) -> dict[str, float]:
    text = httpx.get(f"{base_url}/metrics", timeout=60).text
    return {k: float(v) for k, _, v in (line.rpartition(" ") for line in text.splitlines()
                                        if line and not line.startswith("#"))}


def start_server(tmp: Path, args) -> tuple[subprocess.Popen, str]:
    model_dir = tmp / "model"
    print(f"creating the benchmark model and {args.num_adapters} rank-{args.rank} adapters in "
          f"{tmp} ...", flush=True)
    hf = make_bench_model(model_dir)
    adapters = make_adapters(hf, tmp, args.num_adapters, r=args.rank)
    del hf
    port = args.port
    cmd = [sys.executable, "-m", "loraplex.server", "--model", str(model_dir), "--port", str(port),
           "--served-model-name", "base", "--device", args.device,
           "--max-loras-per-batch", str(args.max_loras_per_batch), "--max-lora-rank",
           str(args.rank), "--max-num-seqs", str(args.max_num_seqs), "--log-level", "warning"]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
           "LORAPLEX_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    log = open(tmp / "server.log", "wb")  # lives as long as the server
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{(tmp / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return proc, base_url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise TimeoutError("server did not become healthy in 600 s")
        time.sleep(0.5)


def adapter_load_stall(args) -> None:
    """How long running streams stall while an adapter loads (``--adapter-load-stall``).

    In process, no HTTP: ``max_num_seqs`` base-model streams decode while a new adapter is
    registered (parsed on the loader's threads). Compares the longest step during the load
    with the median step without one, and with the parse time, which is the stall the old
    design added (it parsed on the engine thread between two steps)."""
    import statistics

    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.sampling_params import SamplingParams

    with tempfile.TemporaryDirectory(prefix="loraplex-bench-stall-") as tmp:
        hf = make_bench_model(Path(tmp) / "model")
        dirs = make_adapters(hf, Path(tmp), 4, r=args.rank)
        del hf
        engine = LLMEngine.from_args(str(Path(tmp) / "model"), device=args.device,
                                     max_num_seqs=args.max_num_seqs, max_lora_rank=args.rank)
        sp = SamplingParams(max_tokens=10_000, temperature=0, ignore_eos=True)
        rng = random.Random(args.seed)
        for i in range(args.max_num_seqs):
            prompt = [rng.randrange(4, args.vocab_size) for _ in range(args.input_len)]
            engine.add_request(f"s{i}", prompt, sp, None)

        def step_time() -> float:
            t = time.perf_counter()
            engine.step()
            return time.perf_counter() - t

        for _ in range(3):  # prefill and warm-up
            step_time()
        quiet = [step_time() for _ in range(20)]
        parse = min(timed_once(lambda p=p: engine.lora_loader.parse("probe", p))
                    for p in list(dirs.values())[:3])
        during: list[float] = []
        for name, path in dirs.items():
            load = engine.submit_adapter_load(name, path)
            while not load.done():
                during.append(step_time())
            load.result()
    median = statistics.median(quiet)
    rows = [["median step, no load (ms)", f"{1e3 * median:.1f}"],
            ["adapter parse time = old design's stall (ms)", f"{1e3 * parse:.1f}"],
            ["steps taken during 4 background loads", str(len(during))],
            ["longest step during a load (ms)", f"{1e3 * max(during, default=0):.1f}"],
            ["longest step during a load / median step",
             f"{max(during, default=0) / median:.2f}x"],
            ["old design: step + parse / median step", f"{(median + parse) / median:.2f}x"]]
    print(f"{args.max_num_seqs} base-model decode streams on the ~150M CPU benchmark model; "
          f"rank-{args.rank} adapters on all 7 projections of 8 layers, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}.\n")
    print(markdown_table(["adapter load while streaming", "value"], rows))


def timed_once(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--request-rate", type=float, default=1.0,
                    help="mean arrivals per second (inf: all at once)")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--num-adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--base-fraction", type=float, default=0.0)
    ap.add_argument("--max-loras-per-batch", type=int, default=8)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-url", default=None, help="benchmark a running server instead")
    ap.add_argument("--vocab-size", type=int, default=32000, help="for random prompt ids")
    ap.add_argument("--small", action="store_true",
                    help="quick run: 16 requests, 8 adapters, 32 prompt / 16 output tokens")
    add_write_docs_flag(ap)
    ap.add_argument("--adapter-load-stall", action="store_true",
                    help="measure the stall an adapter load causes to running streams "
                         "(in process; prints only)")
    ap.add_argument("--chunk-budgets", type=int, nargs="+", default=[256, 24],
                    help="token budgets of scenario (b): the engine default's order of "
                         "magnitude, and a latency budget (about 3x the 8 decoding streams)")
    ap.add_argument("--scenarios", action="store_true",
                    help="prefix caching, chunked prefill and fair admission, each on vs off "
                         "(in process; see scheduler_scenarios.py)")
    args = ap.parse_args()
    if args.scenarios:
        run_scenarios(args)
        return
    if args.adapter_load_stall:
        adapter_load_stall(args)
        return
    if args.small:
        args.num_requests, args.num_adapters = 16, 8
        args.input_len, args.output_len = 32, 16

    load = os.getloadavg()[0]  # other work on the machine skews CPU numbers: say so
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-serving-") as tmp:
        proc = None
        base_url = args.base_url
        if base_url is None:
            proc, base_url = start_server(Path(tmp), args)
        try:
            ids = [m["id"] for m in httpx.get(f"{base_url}/v1/models").json()["data"]]
            if len(ids) < 2:
                args.base_fraction = 1.0
            before = server_counters(base_url)
            print(f"sending {args.num_requests} requests at {args.request_rate}/s ...",
                  flush=True)
            results, duration = asyncio.run(run_load(base_url, ids, args))
            after = server_counters(base_url)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    rows = summarize(results, duration)
    loads = "loraplex_adapter_loads_total"
    evictions = "loraplex_adapter_evictions_total"
    rows.append(["adapter slot loads / evictions (server)",
                 f"{after.get(loads, 0) - before.get(loads, 0):.0f} / "
                 f"{after.get(evictions, 0) - before.get(evictions, 0):.0f}"])
    errors = [r.error for r in results if not r.ok]
    if errors:
        print(f"{len(errors)} requests failed, e.g. {errors[0]}", file=sys.stderr)
    load_desc = (f"Open-loop Poisson arrivals at {args.request_rate} req/s (seed {args.seed}), "
                 f"{args.num_requests} streaming requests of {args.input_len} prompt + "
                 f"{args.output_len} output tokens, spread uniformly over {len(ids) - 1} "
                 f"adapters (base fraction {args.base_fraction})")
    if args.base_url is not None:  # its setup is the running server's, not known here
        setup = (f"{load_desc}, against the running server at {args.base_url} (its flags, "
                 f"model and hardware are whatever it was started with). `python "
                 f"benchmarks/bench_serving.py --base-url {args.base_url}`.")
    else:
        setup = (f"{load_desc}, rank {args.rank}; server "
                 f"--max-loras-per-batch {args.max_loras_per_batch} --max-num-seqs "
                 f"{args.max_num_seqs} on {args.device} ({args.threads} threads, "
                 f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                 f"load average {load:.1f} before the run). "
                 f"Random Llama ~150M parameters (hidden 1024, 8 layers, 16/4 heads, "
                 f"vocab 32000), float32. `python benchmarks/bench_serving.py"
                 f"{' --small' if args.small else ''}`.")
    table = markdown_table(["metric", "value"], rows)
    report(args, "Serving", f"{setup}\n\n{table}")


def run_scenarios(args) -> None:
    """The scheduler scenarios on a smaller random Llama (this CPU cannot prefill thousands
    of tokens of the 150M model many times over in minutes)."""
    import scheduler_scenarios as sc
    import torch

    torch.set_num_threads(args.threads)
    shape = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=8192)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-sched-") as tmp:
        hf = make_bench_model(Path(tmp) / "model", **shape)
        adapters = make_adapters(hf, Path(tmp), 8, r=args.rank)
        model = Path(tmp) / "model"
        a = sc.prefix_caching(model, adapters, system_len=1000, rounds=3)
        b = [[f"{budget}", *row] for budget in args.chunk_budgets
             for row in sc.chunked_prefill(model, adapters, prompt_len=4000, budget=budget,
                                           arrivals=2)]
        c = sc.fair_admission(model, adapters, num_requests=96)
    body = (
        f"In process, CPU ({args.threads} threads, {os.cpu_count()} cores, load average "
        f"{load:.1f} before the run: other work shares this machine, so read ratios, not "
        f"absolute times). Random Llama hidden 256, 4 layers, 8/2 heads, vocab 32000, "
        f"float32; 8 rank-{args.rank} adapters. `python benchmarks/bench_serving.py "
        f"--scenarios`.\n\n"
        f"(a) 1,000-token shared system prompt + 16-token user turns, 3 rounds over 8 "
        f"adapters, one request at a time:\n\n"
        + markdown_table(["", "TTFT p50 (ms)", "TTFT p99 (ms)"], a)
        + f"\n\nTTFT p50 ratio off / on: {float(a[0][1]) / max(float(a[1][1]), 1e-9):.1f}x"
        f"\n\n(b) 8 adapter streams decoding while two 4,000-token base-model prompts "
        f"arrive, at each token budget (`--chunk-budgets`); the engine steps until each long "
        f"prompt's first token and 10 steps more, in both modes:\n\n"
        + markdown_table(["budget", "", "inter-token p50 (ms)", "p99 (ms)", "p99 / p50",
                          "longest gap (ms)", "long prompt TTFT p50 (ms)"], b)
        + "\n\n(c) 96 requests, 30% base model, the rest Zipf-skewed over 6 adapters with "
        "2 adapter slots (the head often waits for a slot):\n\n"
        + markdown_table(["", "base TTFT p50 (ms)", "base TTFT p99 (ms)",
                          "adapter TTFT p99 (ms)"], c))
    report(args, "Scheduler scenarios (CPU)", body)


if __name__ == "__main__":
    main()
