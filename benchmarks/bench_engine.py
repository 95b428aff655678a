"""loraplex vs transformers ``generate`` on CPU: a ~150M-parameter random Llama, float32,
2 threads, batches of 8 and 32 prompts of 128 tokens, 32 new tokens each (greedy).

    python benchmarks/bench_engine.py [--batches 8 32] [--threads 2] [--repeat 2]

Both run side by side in one process; the table (tokens/s and the ratio) is printed and
written to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import bench_threads, make_bench_model, markdown_table, timed, write_section

from loraplex import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "docs" / "benchmarks.md"))
    args = ap.parse_args()
    bench_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        hf = make_bench_model(Path(tmp))
        llm = LLM(tmp, device="cpu", max_num_seqs=max(args.batches))
        rows = []
        for bsz in args.batches:
            g = torch.Generator().manual_seed(bsz)
            ids = torch.randint(3, 32000, (bsz, args.prompt_len), generator=g)
            sp = SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True)

            def run_ours(ids=ids, sp=sp):
                outs = llm.generate(ids.tolist(), sp)
                assert all(len(o.token_ids) == args.new_tokens for o in outs)

            def run_hf(ids=ids):
                with torch.no_grad():
                    out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, pad_token_id=0)
                assert out.shape[1] == args.prompt_len + args.new_tokens

            run_ours()  # warm up both
            run_hf()
            t_ours = t_hf = float("inf")
            for _ in range(args.repeat):  # interleaved, so drifts in machine speed hit both
                t_ours = min(t_ours, timed(run_ours))
                t_hf = min(t_hf, timed(run_hf))
            n = bsz * args.new_tokens
            rows.append([bsz, f"{n / t_hf:.1f}", f"{n / t_ours:.1f}", f"{t_hf / t_ours:.2f}x"])
            print(rows[-1], flush=True)
    table = markdown_table(
        ["batch", "transformers tok/s", "loraplex tok/s", "loraplex / HF"], rows)
    body = (f"Random Llama, hidden 1024, 8 layers, 16 heads / 4 kv heads, intermediate 2816, "
            f"vocab 32000 (~150M parameters); CPU float32, {args.threads} threads; "
            f"{args.prompt_len}-token prompts, {args.new_tokens} new tokens (greedy); "
            f"best of {args.repeat}, measured side by side in one run. Tokens/s counts "
            f"generated tokens over the whole request (prefill included).\n\n"
            f"`python benchmarks/bench_engine.py`\n\n{table}\n")
    print(table)
    write_section(Path(args.out), "Engine vs transformers (CPU)", body)


if __name__ == "__main__":
    main()
