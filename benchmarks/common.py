"""Shared benchmark helpers: the ~150M-parameter random Llama of the CPU benchmarks, random
PEFT adapters for it, and markdown tables."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

BENCH_SHAPE = dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16,
                   num_key_value_heads=4, intermediate_size=2816, vocab_size=32000,
                   max_position_embeddings=2048)
ALL_PROJS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer over ``vocab_size`` made-up words (benchmarks feed token ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(out_dir))


def make_bench_model(out_dir: Path, seed: int = 0, **overrides):
    """Save a random Llama of the benchmark shape (float32) to ``out_dir``; return the HF model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**(BENCH_SHAPE | overrides), bos_token_id=1, eos_token_id=2)
    return save_random_model(LlamaForCausalLM(cfg), out_dir)


def save_random_model(model, out_dir: Path):
    """Re-draw ``model``'s matrices (HF's init is tiny; this gives activations a realistic
    spread), save it with a word-level tokenizer to ``out_dir``; return it in eval mode."""
    model.eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    model.save_pretrained(str(out_dir))
    save_tokenizer(out_dir, model.config.vocab_size)
    return model


def make_adapters(model, out_root: Path, n: int, r: int = 16, targets=ALL_PROJS) -> dict[str, str]:
    """``n`` random rank-``r`` PEFT adapters on ``targets`` saved under ``out_root``."""
    import copy

    from peft import LoraConfig, get_peft_model

    dirs = {}
    for i in range(n):
        torch.manual_seed(1000 + i)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets),
                         init_lora_weights=False, lora_dropout=0.0)
        pm = get_peft_model(copy.deepcopy(model), cfg)
        path = out_root / f"lora{i}"
        pm.save_pretrained(str(path))
        dirs[f"lora{i}"] = str(path)
    return dirs


def bench_threads(n: int = 2) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def timed(fn, repeat: int = 1) -> float:
    """Best wall time of ``repeat`` runs, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def add_write_docs_flag(ap: argparse.ArgumentParser) -> None:
    """``--write-docs [FILE]``: also replace this script's section of docs/benchmarks.md (or
    FILE). Without it a script only prints, so running one leaves the checkout clean."""
    ap.add_argument("--write-docs", nargs="?", type=Path, const=DOCS, default=None,
                    metavar="FILE", help=f"also write the results into FILE (default: {DOCS})")


def report(args: argparse.Namespace, heading: str, body: str) -> None:
    """Print a script's results section; write it into the docs when ``--write-docs``."""
    print(f"\n## {heading}\n\n{body.strip()}\n", flush=True)
    if args.write_docs is not None:
        write_section(args.write_docs, heading, body)
        print(f"written to {args.write_docs}")


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace the ``## heading`` section of a markdown file in place (or append it). Notes
    that must outlive a rerun belong in a section of their own."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    marker = f"## {heading}\n"
    section = f"{marker}\n{body.strip()}\n"
    if marker not in text:
        path.write_text(text.rstrip("\n") + f"\n\n{section}")
        return
    start = text.index(marker)
    nxt = text.find("\n## ", start + len(marker))
    rest = text[nxt + 1:] if nxt != -1 else ""
    path.write_text(text[:start] + section + ("\n" + rest if rest else ""))
