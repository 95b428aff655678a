"""Generate throughput of a real model's exact shape with random weights, with and without
the real adapters' shapes, on this machine (prints only).

The walkthrough in docs/real-models.md serves a public instruct model with two public LoRA
adapters. Their weights cannot be downloaded everywhere (CI has no network), but speed depends
on shapes, not on weight values: this script writes a random checkpoint whose config.json
carries the real model's shape fields, and two random PEFT adapters with the real adapters'
rank, alpha and target modules, then times ``LLM.generate`` on one batch three ways, runs
interleaved: the base model, all prompts on the first adapter, and the prompts split over
both adapters (one mixed batch).

    python benchmarks/bench_real_shape.py [--model qwen2.5-0.5b | smollm2-135m]
        [--batch 8] [--prompt-len 128] [--output-len 32] [--repeat 2] [--threads 2]
        [--device cpu | cuda] [--dtype float32 | bfloat16] [--clock wall | cpu]

The shapes below are the models' config.json values (hub ids in ``MODELS``); the adapters'
are their adapter_config.json values (see docs/real-models.md for the repositories).
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from common import bench_threads, markdown_table, save_random_model

ALL_PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class AdapterShape:
    name: str
    hub_id: str
    r: int
    lora_alpha: int
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class ModelShape:
    hub_id: str
    model_type: str  # transformers config class: "qwen2" | "llama"
    config: dict  # the shape fields of the model's config.json
    adapters: list[AdapterShape] = field(default_factory=list)


MODELS = {
    "qwen2.5-0.5b": ModelShape(
        "Qwen/Qwen2.5-0.5B-Instruct", "qwen2",
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
             max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
             tie_word_embeddings=True, use_sliding_window=False, sliding_window=None),
        [AdapterShape("finbot", "sujithatz/quen_2.5_qlora", 16, 32, tuple(ALL_PROJS)),
         AdapterShape("hh-dpo", "XueyingJia/qwen2.5-0.5b-ours", 8, 16, ("q_proj", "v_proj"))]),
    # SmolLM2's adapters are not verified here: two adapters of common shapes stand in
    "smollm2-135m": ModelShape(
        "HuggingFaceTB/SmolLM2-135M-Instruct", "llama",
        dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
             num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
             max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
             tie_word_embeddings=True),
        [AdapterShape("all-r16", "(none: a stand-in)", 16, 32, tuple(ALL_PROJS)),
         AdapterShape("qv-r8", "(none: a stand-in)", 8, 16, ("q_proj", "v_proj"))]),
}


def build_checkpoint(shape: ModelShape, out: Path, seed: int = 0):
    """A random ``*ForCausalLM`` with ``shape``'s config fields saved to ``out`` (float32, with
    a word-level tokenizer over the vocabulary); returns the model for the adapters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(shape.model_type, **shape.config, bos_token_id=1,
                               eos_token_id=2)
    torch.manual_seed(seed)
    return save_random_model(AutoModelForCausalLM.from_config(cfg), out)


def build_adapter(model, a: AdapterShape, out: Path, seed: int) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=a.r, lora_alpha=a.lora_alpha, target_modules=list(a.target_modules),
                     init_lora_weights=False, lora_dropout=0.0)
    get_peft_model(copy.deepcopy(model), cfg).save_pretrained(str(out))
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="qwen2.5-0.5b")
    ap.add_argument("--batch", type=int, default=8, help="requests in the batch")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=2, help="best of this many interleaved runs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or the process's CPU time (with --threads 1 it does not "
                         "count the time spent waiting for a core on a shared host)")
    args = ap.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    bench_threads(args.threads)

    from loraplex import LLM, SamplingParams

    shape = MODELS[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        hf = build_checkpoint(shape, root / "model")
        adapters = {a.name: build_adapter(hf, a, root / a.name, seed=100 + i)
                    for i, a in enumerate(shape.adapters)}
        del hf
        print(f"random {shape.hub_id}-shaped checkpoint and adapters written in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        llm = LLM(str(root / "model"), adapters=adapters, device=args.device, dtype=args.dtype,
                  max_num_seqs=args.batch, max_loras_per_batch=len(adapters),
                  max_lora_rank=max(a.r for a in shape.adapters),
                  max_model_len=args.prompt_len + args.output_len,
                  enable_prefix_caching=False)  # the same prompts run again
        vocab = shape.config["vocab_size"]
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=g).tolist()
        names = [a.name for a in shape.adapters]
        cases = {"base model": [None] * args.batch,
                 f"all on {names[0]}": [names[0]] * args.batch,
                 f"mixed: {' / '.join(names)}": [names[i % len(names)]
                                                 for i in range(args.batch)]}
        sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
        llm.generate([prompts[0][:8]], SamplingParams(max_tokens=2), adapters=names[:1])
        best: dict[str, float] = {}
        for _ in range(args.repeat):  # interleaved, so load drifts hit every case alike
            for key, adapter_names in cases.items():
                t = clock()
                outs = llm.generate(prompts, sp, adapters=adapter_names)
                dt = clock() - t
                assert sum(len(o.token_ids) for o in outs) == args.batch * args.output_len
                best[key] = min(best.get(key, float("inf")), dt)
    ntok = args.batch * args.output_len
    base = best["base model"]
    rows = [[key, f"{dt:.2f}", f"{ntok / dt:.1f}", f"{dt / base:.3f}"]
            for key, dt in best.items()]
    adapters_text = "; ".join(f"{a.name} ({a.hub_id}): r={a.r}, alpha={a.lora_alpha}, "
                              f"{'/'.join(p.removesuffix('_proj') for p in a.target_modules)}"
                              for a in shape.adapters)
    device = "CPU" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"\nRandom weights in the shape of {shape.hub_id} "
          f"({', '.join(f'{k}={v}' for k, v in shape.config.items())}); adapters: "
          f"{adapters_text}. {args.batch} requests x ({args.prompt_len} prompt + "
          f"{args.output_len} generated tokens), greedy, one LLM.generate call each; "
          f"{device}, {str(llm.engine.dtype).removeprefix('torch.')}, {args.threads} threads, "
          f"{args.clock} clock, best of {args.repeat} interleaved runs.\n")
    print(markdown_table(["batch", "seconds", "generated tok/s", "time / base"], rows))


if __name__ == "__main__":
    main()
