"""The ``loraplex`` command: serve, generate, demo, bench. Flags map onto the engine's config
in one place (``LLMEngine.from_args``)."""

from __future__ import annotations

import argparse
import sys

from loraplex.errors import LoraplexError


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model directory")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="register a PEFT adapter directory under NAME (repeatable)")
    p.add_argument("--device", default="auto", help="cpu | cuda | auto")
    p.add_argument("--dtype", default="auto", help="float32 | bfloat16 | float16 | auto")
    p.add_argument("--max-loras-per-batch", type=int, default=8)
    p.add_argument("--max-lora-rank", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=64)
    add_tensor_parallel_arg(p)
    add_lm_head_lora_arg(p)
    _memory_args(p)


def add_lm_head_lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--enable-lm-head-lora", action="store_true",
                   help="serve adapters that target lm_head (allocates vocab x max-lora-rank x "
                        "max-loras-per-batch of adapter buffers; off: such adapters are refused)")


def add_tensor_parallel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", "--tp", type=int, default=1, metavar="N",
                   help="split the model over N ranks (torch.distributed: NCCL, one GPU a "
                        "rank; gloo on CPU); this process is rank 0 and starts the others "
                        "(default: 1)")


_SIZE_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
               "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str) -> int:
    """``"2GiB"`` / ``"512MiB"`` / ``"1.5GB"`` / ``"1073741824"`` -> bytes (argparse type)."""
    value = text.strip()
    num = value.rstrip("BbKkMmGgTtIi")
    unit = value[len(num):].strip().lower()
    try:
        size = float(num) * _SIZE_UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: a number of bytes or e.g. 512MiB, 2GiB, 1.5GB") from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least one byte")
    return int(size)


def _memory_args(p: argparse.ArgumentParser) -> None:
    """KV-cache sizing flags (serve, generate, bench)."""
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                   help="on CUDA the KV cache takes what is left of this fraction of the GPU "
                        "after the weights, adapter slots and the largest step (default 0.9)")
    p.add_argument("--kv-cache-memory", type=parse_size, default=None, metavar="SIZE",
                   help="KV cache budget, e.g. 2GiB or 512MiB (skips the GPU memory profile; "
                        "default on CPU: 1GiB)")
    p.add_argument("--max-full-module-adapters", type=int, default=0, metavar="N",
                   help="device slots for adapters with a full embedding / lm_head copy (PEFT "
                        "modules_to_save), 2 x vocab x hidden each; 0 (default) refuses them")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[])


def _build_llm(args):
    from loraplex.llm import LLM
    from loraplex.server.api import parse_adapter_flags

    return LLM(args.model, adapters=parse_adapter_flags(args.adapter), device=args.device,
               dtype=args.dtype, max_loras_per_batch=args.max_loras_per_batch,
               max_lora_rank=args.max_lora_rank, max_num_seqs=args.max_num_seqs,
               gpu_memory_utilization=args.gpu_memory_utilization,
               kv_cache_memory_bytes=args.kv_cache_memory,
               max_full_module_adapters=args.max_full_module_adapters,
               tensor_parallel_size=args.tensor_parallel_size,
               enable_lm_head_lora=args.enable_lm_head_lora)


def cmd_generate(args) -> None:
    from loraplex.sampling_params import SamplingParams

    llm = _build_llm(args)
    sp = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=args.stop)
    for out in llm.generate(args.prompt, sp, adapters=args.use_adapter):
        print(out.text)


# Synthetic request size when the flags leave it open; clipped to the model's context.
BENCH_INPUT_LEN, BENCH_OUTPUT_LEN = 128, 32


def bench_sizes(context: int, input_len: int | None, output_len: int | None) -> tuple[int, int]:
    """(input, output) tokens per request: the defaults, shrunk so that prompt plus output fit
    in ``context`` tokens (a quarter of it at most for the output). Explicit values are kept
    as given: a prompt that does not fit is the user's error, reported by the engine."""
    out = output_len if output_len is not None else max(1, min(BENCH_OUTPUT_LEN, context // 4))
    inp = input_len if input_len is not None else max(1, min(BENCH_INPUT_LEN, context - out))
    return inp, out


def bench_prompts(n: int, length: int, vocab_size: int, special_ids: list[int]) -> list[list[int]]:
    """``n`` distinct synthetic prompts of ``length`` ids below ``vocab_size``, no special ids
    (a BOS or EOS in the middle of a prompt is not what a user sends)."""
    specials = set(special_ids)
    ids = [t for t in range(vocab_size) if t not in specials] or list(range(vocab_size))
    return [[ids[(7 * i + 3 * j) % len(ids)] for j in range(length)] for i in range(n)]


def cmd_bench(args) -> None:
    """Offline throughput of one batch: prompts spread over every registered adapter."""
    import time

    from loraplex.sampling_params import SamplingParams

    llm = _build_llm(args)
    engine = llm.engine
    input_len, output_len = bench_sizes(engine.max_model_len, args.input_len, args.output_len)
    vocab = engine.model_config.vocab_size
    specials: list[int] = []
    if engine.tokenizer is not None:
        vocab = min(vocab, len(engine.tokenizer))  # ids past the tokenizer decode to nothing
        specials = list(engine.tokenizer.all_special_ids)
    prompts = bench_prompts(args.batch, input_len, vocab, specials)
    names = llm.list_adapters() or [None]
    adapters = [names[i % len(names)] for i in range(args.batch)]
    sp = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    # warm up on a prompt outside the measured set (it would be a prefix-cache hit)
    llm.generate([prompts[0][::-1]], SamplingParams(max_tokens=2), adapters=adapters[:1])
    t = time.perf_counter()
    outs = llm.generate(prompts, sp, adapters=adapters)
    dt = time.perf_counter() - t
    n = sum(len(o.token_ids) for o in outs)
    spread = ("base model only" if names == [None]
              else f"over {len(set(adapters))} adapter{'s' if len(set(adapters)) > 1 else ''}")
    print(f"{args.batch} requests ({input_len} prompt + {output_len} output tokens each), "
          f"{spread}: {n} tokens in {dt:.2f} s = {n / dt:.1f} generated tokens/s")


def show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append each option's default to its help text (argparse's ArgumentDefaultsHelpFormatter
    skips options without help text, and most of ours have none)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                show_defaults(sub)
            continue
        default = action.default
        if (not action.option_strings or default is None or default is False or default == []
                or default == argparse.SUPPRESS or "default" in (action.help or "")):
            continue
        note = "default: %(default)s"
        action.help = f"{action.help} ({note})" if action.help else note


DESCRIPTION = """Serve one base LLM with many LoRA adapters in one batch.

Start with 'loraplex demo': a tiny shipped model and three adapters, one mixed batch.
Each command's flags: loraplex COMMAND --help."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loraplex", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    from loraplex.server.api import add_serve_args

    _memory_args(add_serve_args(sub.add_parser("serve", help="OpenAI-compatible HTTP server")))

    sr = sub.add_parser("serve-ray", help="many engine replicas behind one endpoint on Ray "
                                          "Serve (needs the 'ray' extra)")
    from loraplex.serve_ray.config import add_serve_ray_args  # flags only: no Ray import

    _memory_args(add_serve_ray_args(sr))
    add_lm_head_lora_arg(sr)

    g = sub.add_parser("generate", help="complete prompts and print the outputs")
    _engine_args(g)
    _sampling_args(g)
    g.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    g.add_argument("--use-adapter", default=None, help="adapter name for every prompt")

    d = sub.add_parser("demo", help="the shipped demo: one batch, three adapters")
    d.add_argument("--serve", action="store_true", help="serve the demo model over HTTP")
    d.add_argument("--port", type=int, default=8000)
    d.add_argument("--device", default="auto")

    b = sub.add_parser("bench", help="offline throughput of one mixed-adapter batch")
    _engine_args(b)
    b.add_argument("--batch", type=int, default=32, help="requests in the batch")
    b.add_argument("--input-len", type=int, default=None,
                   help=f"prompt tokens per request (default: {BENCH_INPUT_LEN}, "
                        f"less where the model's context is shorter)")
    b.add_argument("--output-len", type=int, default=None,
                   help=f"generated tokens per request (default: {BENCH_OUTPUT_LEN}, at most "
                        f"a quarter of the model's context)")

    show_defaults(parser)
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            from loraplex.server.api import run_server

            run_server(args)
        elif args.command == "serve-ray":
            try:
                from loraplex.serve_ray.app import run_serve_ray
            except ImportError as exc:
                raise ValueError(str(exc)) from None
            run_serve_ray(args)
        elif args.command == "generate":
            cmd_generate(args)
        elif args.command == "demo":
            from loraplex.demo.run import run_demo

            run_demo(args)
        else:
            cmd_bench(args)
    except (LoraplexError, ValueError) as e:
        print(f"loraplex {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
