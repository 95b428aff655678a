"""What structured outputs cost a batch: the benchmark model (~150M-parameter random Llama,
32000-token vocabulary, float32, CPU) generating for one batch of requests where none, some
or all rows carry a grammar (a regex every token of the vocabulary can continue, so no row
ends early and every run generates the same number of tokens).

    python benchmarks/bench_guided.py [--batch 64] [--guided 8 64] [--threads 2]
                                      [--layers N] [--mask-only] [--write-docs]

Rows without a grammar should cost nothing extra (the last row runs once the engine has
built its grammar state); each guided row adds its bitmask fill (xgrammar, on
the host) and its share of the masking. Printed side by side as tokens/s and ratios.
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
from loraplex.engine.guided import GuidedParams

# every token of the benchmark tokenizer is "w<digits>": this regex never forces an end
REGEX = "(w[0-9]+)+"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--guided", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--layers", type=int, default=None,
                    help="fewer layers than the benchmark shape: a cheaper forward, so the "
                         "grammar's share of a step shows larger (a pessimistic ratio)")
    ap.add_argument("--mask-only", action="store_true",
                    help="time the mask stage only (no generation runs)")
    add_write_docs_flag(ap)
    args = ap.parse_args()
    bench_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        make_bench_model(Path(tmp), **({} if args.layers is None
                                        else {"num_hidden_layers": args.layers}))
        llm = LLM(tmp, device="cpu", max_num_seqs=args.batch,
                  enable_prefix_caching=False)  # the same prompts every repeat
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 32000, (args.batch, args.prompt_len), generator=g).tolist()
        guided = GuidedParams(regex=REGEX)

        def run(k: int) -> None:
            params = [SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=i,
                                     ignore_eos=True, guided=guided if i < k else None)
                      for i in range(args.batch)]
            outs = llm.generate(prompts, params)
            assert all(len(o.token_ids) == args.new_tokens for o in outs)

        # no grammar first (xgrammar not even imported), then the guided batches, then no
        # grammar again once the engine holds its grammar state
        cases = ([("none", 0)] + [(f"{k} of {args.batch}", k) for k in args.guided if k]
                 + [("none, after the guided runs", 0)])
        rows, base = [], None
        for label, k in [] if args.mask_only else cases:
            run(k)  # warm-up (and the grammar compile, cached from then on)
            s = timed(lambda k=k: run(k), args.repeat)
            tps = args.batch * args.new_tokens / s
            base = base or tps
            rows.append([label, f"{tps:.0f}", f"{base / tps:.3f}"])
        stage = mask_stage_ms(llm, guided, args.batch, args.guided)
    layers = "" if args.layers is None else f", {args.layers} layers"
    body = (f"`bench_guided.py`: batch {args.batch}{layers}, prompt {args.prompt_len} tokens, "
            f"{args.new_tokens} new tokens, {args.threads} threads, best of {args.repeat}; "
            f"regex `{REGEX}` on the guided rows.\n\n"
            + (markdown_table(["rows with a grammar", "tokens/s", "time vs no grammar"], rows)
               if rows else "(generation runs skipped: --mask-only)")
            + "\n\nThe mask stage alone (fill the bitmask on the host, mask the logits), per step, "
            f"on [{args.batch}, 32000] float32 logits, best of 50:\n\n"
            + markdown_table(["rows with a grammar", "ms per step"],
                             [[f"{k} of {args.batch}", f"{ms:.3f}"] for k, ms in stage]))
    report(args, "Structured outputs (CPU)", body)


def mask_stage_ms(llm: LLM, guided: GuidedParams, batch: int,
                  counts: list[int]) -> list[tuple[int, float]]:
    """Milliseconds per step of ``GuidedDecoding.apply`` with ``k`` guided rows, for each k
    (matchers at their start state; no model run)."""
    state = llm.engine.guided_decoding()
    logits = torch.randn(batch, llm.engine.model_config.vocab_size)
    out = []
    for k in [0, *counts]:
        ids = list(range(-1, -batch - 1, -1))  # ids no real sequence has
        for i in ids[:k]:
            state.add(i, guided)
        out.append((k, 1e3 * timed(lambda ids=ids: state.apply(logits, ids), 50)))
        for i in ids[:k]:
            state.drop(i)
    return out


if __name__ == "__main__":
    main()
