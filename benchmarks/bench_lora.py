"""Multi-LoRA overhead on CPU: the ~150M-parameter random Llama of bench_engine.py, 32 rank-16
adapters on all seven projections, float32, 2 threads. In one run:

  (a) prefill of 32 x 128-token prompts, (b) 32 decode steps — each with 32 distinct adapters
  vs the same prompts on the base model in loraplex; (c) the same mixed workload through
  transformers + PEFT (``adapter_names=``) and PEFT's own base.

    python benchmarks/bench_lora.py [--adapters 32] [--repeat 3]

Prints the table with the decode floor computed from measured memory bandwidth, and writes
it to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import bench_threads, make_adapters, make_bench_model, markdown_table, write_section

from loraplex import LLM, SamplingParams


def measure_bandwidth() -> float:
    """Bytes/s of a large copy (read + write counted), best of 5."""
    src = torch.randn(64 << 20 >> 2)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best


def loraplex_times(llm: LLM, prompts, names, steps: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step) of one batch through the engine."""
    engine = llm.engine
    sp = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=True)
    for i, (p, a) in enumerate(zip(prompts, names, strict=True)):
        engine.add_request(f"b{i}", p, sp, a)
    t = time.perf_counter()
    started: set[str] = set()
    while len(started) < len(prompts):  # the prefill may take more than one step
        started.update(o.request_id for o in engine.step())
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    decode = (time.perf_counter() - t) / steps
    assert not engine.has_unfinished_requests()
    return prefill, decode


def peft_times(model, ids: torch.Tensor, names, steps: int) -> tuple[float, float]:
    kw = {} if names is None else {"adapter_names": names}
    mask = torch.ones_like(ids)
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, do_sample=False,
                       pad_token_id=0, **kw)
        prefill = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps + 1,
                       min_new_tokens=steps + 1, do_sample=False, pad_token_id=0, **kw)
        total = time.perf_counter() - t
    return prefill, max(total - prefill, 1e-9) / steps


def best(fn, repeat: int) -> tuple[float, float]:
    runs = [fn() for _ in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    bench_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = make_bench_model(root / "model")
        dirs = make_adapters(hf, root, args.adapters, args.rank)
        names = [f"lora{i % args.adapters}" for i in range(args.batch)]
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 32000, (args.batch, args.prompt_len), generator=g)
        prompts = ids.tolist()
        llm = LLM(str(root / "model"), adapters=dirs, device="cpu", max_num_seqs=args.batch,
                  max_loras_per_batch=args.adapters, max_lora_rank=args.rank)
        loraplex_times(llm, prompts[:2], names[:2], 2)  # warm up
        rows = {}
        for _ in range(args.repeat):  # interleave base and mixed so load drifts hit both
            for key, ns in (("base", [None] * args.batch), ("mixed", names)):
                p, d = loraplex_times(llm, prompts, ns, args.steps)
                old = rows.get(key, (float("inf"), float("inf")))
                rows[key] = (min(old[0], p), min(old[1], d))
        if not args.skip_peft:
            from peft import PeftModel

            pm = PeftModel.from_pretrained(hf, dirs["lora0"], adapter_name="lora0")
            for name, path in list(dirs.items())[1:]:
                pm.load_adapter(path, adapter_name=name)
            pm.eval()
            peft_times(pm, ids[:2], names[:2], 2)  # warm up
            rows["peft_mixed"] = best(lambda: peft_times(pm, ids, names, args.steps), args.repeat)
            with pm.disable_adapter():
                rows["peft_base"] = best(lambda: peft_times(pm, ids, None, args.steps),
                                         args.repeat)
    bw = measure_bandwidth()
    cfg = llm.engine.model_config  # bytes of one adapter: A [r, in] + B [out, r], float32
    per_adapter = args.rank * 4 * cfg.num_layers * sum(
        i + o for i, o in cfg.proj_shapes().values())
    floor = rows["base"][1] + len(set(names)) * per_adapter / bw
    ntok = args.batch
    table_rows = [
        ["loraplex base", f"{rows['base'][0]:.3f}", f"{rows['base'][1] * 1e3:.1f}",
         f"{ntok / rows['base'][1]:.0f}", "1.00", "1.00"],
        [f"loraplex {len(set(names))} adapters", f"{rows['mixed'][0]:.3f}",
         f"{rows['mixed'][1] * 1e3:.1f}",
         f"{ntok / rows['mixed'][1]:.0f}", f"{rows['mixed'][0] / rows['base'][0]:.3f}",
         f"{rows['mixed'][1] / rows['base'][1]:.3f}"],
        ["decode floor (base + adapter bytes / bandwidth)", "", f"{floor * 1e3:.1f}", "", "",
         f"{floor / rows['base'][1]:.3f}"],
    ]
    if "peft_mixed" in rows:
        pb, pmx = rows["peft_base"], rows["peft_mixed"]
        table_rows += [
            ["transformers base", f"{pb[0]:.3f}", f"{pb[1] * 1e3:.1f}", f"{ntok / pb[1]:.0f}",
             "", ""],
            [f"transformers + PEFT {len(set(names))} adapters", f"{pmx[0]:.3f}",
             f"{pmx[1] * 1e3:.1f}",
             f"{ntok / pmx[1]:.0f}", f"{pmx[0] / pb[0]:.3f}", f"{pmx[1] / pb[1]:.3f}"],
        ]
    table = markdown_table(["run", "prefill s", "decode ms/step", "decode tok/s",
                            "prefill / base", "decode / base"], table_rows)
    summary = ""
    if "peft_mixed" in rows:
        summary = (f"\nloraplex vs PEFT on the mixed workload: decode "
                   f"{rows['peft_mixed'][1] / rows['mixed'][1]:.2f}x PEFT's tokens/s, prefill "
                   f"{rows['peft_mixed'][0] / rows['mixed'][0]:.2f}x PEFT's speed.\n")
    body = (f"{args.batch} prompts x {args.prompt_len} tokens, {args.steps} decode steps, "
            f"{len(set(names))} distinct rank-{args.rank} adapters on all seven projections; "
            f"CPU float32, {args.threads} threads; best of {args.repeat}, side by side in one "
            f"run. Measured copy bandwidth {bw / 1e9:.1f} GB/s; one adapter is "
            f"{per_adapter / 1e6:.1f} MB.\n\n`python benchmarks/bench_lora.py`\n\n{table}\n"
            f"{summary}")
    print(body)
    write_section(Path(args.out), "Multi-LoRA overhead (CPU)", body)


if __name__ == "__main__":
    main()
