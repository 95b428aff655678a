"""loraplex vs transformers ``generate`` on CPU: a ~150M-parameter random Llama, float32,
2 threads, batches of 8 and 32 prompts of 128 tokens, 32 new tokens each (greedy).

    python benchmarks/bench_engine.py [--batches 8 32] [--threads 2] [--repeat 5] [--write-docs]

Both run side by side in one process; the table (tokens/s and the ratio) is printed, and
written to docs/benchmarks.md with ``--write-docs``.

    python benchmarks/bench_engine.py --logprobs 5 [--batches 64] [--write-docs]

instead compares loraplex with itself: the same greedy batch with ``logprobs=K`` (top-K per
generated token) against the plain batch, side by side (the cost of logprobs).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import (
    add_write_docs_flag,
    bench_threads,
    make_bench_model,
    markdown_table,
    report,
    timed,
)

from loraplex import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    # best of 5: on a shared host one slow stretch can cover a whole 10 s run, and a best of 3
    # moved the batch-32 ratio by +-0.1 between runs of the same code
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--logprobs", type=int, default=None,
                    help="compare logprobs=K against plain greedy (no transformers)")
    add_write_docs_flag(ap)
    args = ap.parse_args()
    bench_threads(args.threads)
    if args.logprobs is not None:
        return logprobs_cost(args)
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_bench_model(Path(tmp))
        # the same prompts every repeat: no prefix-cache hits, as transformers has none
        llm = LLM(tmp, device="cpu", max_num_seqs=max(args.batches), enable_prefix_caching=False)
        rows = []
        for bsz in args.batches:
            g = torch.Generator().manual_seed(bsz)
            ids = torch.randint(3, 32000, (bsz, args.prompt_len), generator=g)
            runs = {}  # name -> callable; each engine runs the whole request and prefill only
            for label, new in (("", args.new_tokens), (" prefill", 1)):
                sp = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)

                def run_ours(ids=ids, sp=sp, new=new):
                    outs = llm.generate(ids.tolist(), sp)
                    assert all(len(o.token_ids) == new for o in outs)

                def run_hf(ids=ids, new=new):
                    with torch.no_grad():
                        out = hf.generate(ids, attention_mask=torch.ones_like(ids),
                                          do_sample=False, max_new_tokens=new,
                                          min_new_tokens=new, pad_token_id=0)
                    assert out.shape[1] == args.prompt_len + new

                runs["ours" + label], runs["hf" + label] = run_ours, run_hf
            for fn in runs.values():  # warm up
                fn()
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(args.repeat):  # interleaved, so drifts in machine speed hit both
                for name, fn in runs.items():
                    best[name] = min(best[name], timed(fn))
            n = bsz * args.new_tokens
            steps = args.new_tokens - 1

            def per_step(name, best=best, steps=steps):
                return 1e3 * max(best[name] - best[name + " prefill"], 0.0) / steps

            rows.append([bsz, f"{n / best['hf']:.1f}", f"{n / best['ours']:.1f}",
                         f"{best['hf'] / best['ours']:.2f}x",
                         f"{best['hf prefill']:.2f} / {best['ours prefill']:.2f}",
                         f"{per_step('hf'):.0f} / {per_step('ours'):.0f}"])
            print(rows[-1], flush=True)
    table = markdown_table(
        ["batch", "transformers tok/s", "loraplex tok/s", "loraplex / HF",
         "prefill s (HF / ours)", "decode ms/step (HF / ours)"], rows)
    body = (f"Random Llama, hidden 1024, 8 layers, 16 heads / 4 kv heads, intermediate 2816, "
            f"vocab 32000 (~150M parameters); CPU float32, {args.threads} threads; "
            f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens (greedy); "
            f"best of {args.repeat}, measured side by side in one run. Tokens/s counts "
            f"generated tokens over the whole request (prefill included). The prefill column is "
            f"a 1-token run of the same prompts; a decode step is (whole - prefill) / "
            f"{args.new_tokens - 1}.\n\n"
            f"`python benchmarks/bench_engine.py`\n\n{table}\n")
    report(args, "Engine vs transformers (CPU)", body)


def logprobs_cost(args: argparse.Namespace) -> None:
    """Whole greedy requests with and without ``logprobs=K``, interleaved, best of repeat."""
    with tempfile.TemporaryDirectory() as tmp:
        make_bench_model(Path(tmp))
        # the same prompts every repeat: no prefix-cache hits, as transformers has none
        llm = LLM(tmp, device="cpu", max_num_seqs=max(args.batches), enable_prefix_caching=False)
        rows = []
        for bsz in args.batches:
            g = torch.Generator().manual_seed(bsz)
            ids = torch.randint(3, 32000, (bsz, args.prompt_len), generator=g).tolist()
            kinds = {"plain": None, f"logprobs={args.logprobs}": args.logprobs}
            runs = {}
            for name, k in kinds.items():
                sp = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True,
                                    logprobs=k)

                def run(sp=sp, k=k, ids=ids):
                    outs = llm.generate(ids, sp)
                    assert all((o.logprobs is None) == (k is None) for o in outs)

                runs[name] = run
            for fn in runs.values():  # warm up
                fn()
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(args.repeat):  # interleaved: machine drifts hit both
                for name, fn in runs.items():
                    best[name] = min(best[name], timed(fn))
            plain, lp = best.values()
            rows.append([bsz, f"{plain:.2f}", f"{lp:.2f}", f"{lp / plain:.3f}x"])
            print(rows[-1], flush=True)
    table = markdown_table(["batch", "plain s", f"logprobs={args.logprobs} s", "ratio"], rows)
    body = (f"The ~150M random Llama above (vocab 32000), CPU float32, {args.threads} threads; "
            f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens, greedy; whole "
            f"requests, best of {args.repeat}, interleaved in one run.\n\n"
            f"`python benchmarks/bench_engine.py --logprobs {args.logprobs} --batches "
            f"{' '.join(map(str, args.batches))} --prompt-len {args.prompt_len} --new-tokens "
            f"{args.new_tokens} --repeat {args.repeat}`\n\n{table}\n")
    report(args, "Logprobs cost in the engine (CPU)", body)


if __name__ == "__main__":
    main()
