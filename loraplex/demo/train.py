"""Train the shipped demo model and its three LoRA adapters (run by hand, not in CI).

    python -m loraplex.demo.train [--out DIR] [--quick]

Writes to ``./loraplex-demo-trained`` unless ``--out`` says otherwise; the shipped files in
``loraplex/demo/data`` change only when ``--out`` names that directory.

Uses only torch, transformers, peft and tokenizers (never the loraplex engine), so the shipped
files are plain Hugging Face / PEFT artifacts that any loader can read.

1. A character-level tokenizer (one token per printable ASCII character and newline; no BOS or
   other tokens added on encode; the ``Fuse`` decoder gives back the exact characters).
2. A tiny ``LlamaForCausalLM`` (GQA) trained from scratch, with the loss on the answer only.
   Besides the public task (``"in: x\\nout: "`` -> ``x``) it also learns the three adapter
   tasks behind other prefixes (``up:``, ``rv:``, ``cs:``). That curriculum puts the circuits
   (notably reversal, hard to learn through a low-rank update) in the base; each adapter
   then only learns to apply its transformation to the public ``in:`` prompt.
3. Three PEFT LoRA adapters (q/k/v/o/gate/up/down, no bias, no DoRA, no modules_to_save),
   trained on the ``in:`` prompt with that adapter's answer.
4. Reload everything from disk (AutoTokenizer, AutoModelForCausalLM, PeftModel) and score
   greedy ``generate`` on held-out phrases.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from loraplex.demo import ADAPTERS, CHAT_TEMPLATE, expected, prompt
from loraplex.demo.examples import MAX_CHARS, make_batch, test_phrase

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0..3
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
# Rank and alpha per adapter: distinct on purpose, so engines see several ranks and scalings.
LORA_SHAPE = {"upper": (8, 16), "reverse": (32, 32), "caesar": (16, 32)}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: specials, then newline and printable ASCII (100 tokens)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def build_model(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(config)


def train(model, tok, params, steps: int, lr: float, batch: int, tasks, hidden: bool, name: str):
    """AdamW with linear warmup and cosine decay; logs loss and teacher-forced exact match.

    Under teacher forcing, all answer argmaxes being right is exactly greedy correctness.
    """
    rng = random.Random(f"train-{name}")
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    )
    model.train()
    start, loss_sum = time.time(), 0.0
    right, seen = torch.zeros(len(tasks)), torch.zeros(len(tasks))
    for step in range(1, steps + 1):
        input_ids, labels, picks = make_batch(tok, rng, batch, tasks, hidden)
        logits = model(input_ids=input_ids).logits[:, :-1]
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            wrong = ((logits.argmax(-1) != target) & (target != -100)).any(-1)
            right.index_add_(0, picks, (~wrong).float())
            seen.index_add_(0, picks, torch.ones(len(picks)))
        loss_sum += loss.item()
        if step % 50 == 0 or step == steps:
            n = 50 if step % 50 == 0 else step % 50
            exact = " ".join(
                f"{t or 'echo'}={r:.3f}"
                for t, r in zip(tasks, (right / seen).tolist(), strict=True)
            )
            print(
                f"[{name}] step {step}/{steps} loss {loss_sum / n:.4f} exact {exact} "
                f"lr {sched.get_last_lr()[0]:.2e} {time.time() - start:.0f}s",
                flush=True,
            )
            loss_sum = 0.0
            right.zero_(), seen.zero_()
    model.eval()


@torch.no_grad()
def greedy_accuracy(model, tok, phrases: list[str], task: str | None) -> tuple[float, list]:
    """Greedy HF ``generate`` on ``prompt(phrase)``; exact answer followed by EOS counts.

    Prompts are grouped by length, so each batch needs no padding.
    """
    groups: dict[int, list[str]] = {}
    for phrase in phrases:
        groups.setdefault(len(prompt(phrase)), []).append(phrase)
    correct, failures = 0, []
    for group in groups.values():
        ids = torch.tensor([tok.encode(prompt(p), add_special_tokens=False) for p in group])
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_CHARS + 8,
            do_sample=False,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        for phrase, row in zip(group, out[:, ids.shape[1] :].tolist(), strict=True):
            ended = tok.eos_token_id in row
            text = tok.decode(row[: row.index(tok.eos_token_id)] if ended else row)
            if ended and text == expected(phrase, task):
                correct += 1
            else:
                failures.append((phrase, text))
    return correct / len(phrases), failures


def edit_json(path: Path, **fields) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_base(model, tok, out: Path) -> None:
    """Save model + tokenizer, made loader-neutral (transformers 4.x and 5.x read both)."""
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # v5 writes rope_parameters only; 4.x and other loaders look for rope_theta.
    edit_json(out / "config.json", rope_theta=model.config.rope_parameters["rope_theta"])
    # v5 names the class TokenizersBackend, which 4.x does not know.
    edit_json(
        out / "tokenizer_config.json",
        tokenizer_class="PreTrainedTokenizerFast",
        model_max_length=model.config.max_position_embeddings,
        chat_template=CHAT_TEMPLATE,
    )


def save_adapter(peft_model, out: Path) -> None:
    """PEFT save, without this machine's path and the generated model card."""
    peft_model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    cfg = json.loads((out / "adapter_config.json").read_text())
    edit_json(
        out / "adapter_config.json",
        base_model_name_or_path="loraplex-demo",
        target_modules=sorted(cfg["target_modules"]),
    )


def evaluate(out: Path, n: int) -> dict[str, float]:
    """Reload the saved files as a user would and score held-out phrases per mode."""
    tok = AutoTokenizer.from_pretrained(out / "model")
    rng = random.Random("heldout")
    phrases = [test_phrase(rng) for _ in range(n)]
    results = {}
    for task in (None, *ADAPTERS):
        base = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
        model = base if task is None else PeftModel.from_pretrained(base, out / task)
        acc, failures = greedy_accuracy(model.eval(), tok, phrases, task)
        results[task or "base"] = acc
        print(f"eval {task or 'base'}: {acc:.3f} ({len(failures)} wrong) {failures[:5]}")
    return results


DEFAULT_OUT = Path("loraplex-demo-trained")  # relative to the working directory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="output directory (the shipped files are loraplex/demo/data)")
    parser.add_argument("--base-steps", type=int, default=3000)
    parser.add_argument("--adapter-steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-n", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="tiny run to check the pipeline")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.base_steps, args.adapter_steps, args.eval_n = 50, 20, 20
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()

    tok = build_tokenizer()
    model = build_model(len(tok))
    print(f"base: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params", flush=True)
    train(
        model,
        tok,
        list(model.parameters()),
        args.base_steps,
        2e-3,
        args.batch,
        [None, *ADAPTERS],
        True,
        "base",
    )
    (args.out / "model").mkdir(parents=True, exist_ok=True)
    save_base(model, tok, args.out / "model")

    for i, name in enumerate(ADAPTERS):
        torch.manual_seed(1 + i)
        base = AutoModelForCausalLM.from_pretrained(args.out / "model", dtype=torch.float32)
        rank, alpha = LORA_SHAPE[name]
        lora = LoraConfig(
            r=rank,
            lora_alpha=alpha,
            target_modules=TARGETS,
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(base, lora)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        train(peft_model, tok, params, args.adapter_steps, 3e-3, args.batch, [name], False, name)
        save_adapter(peft_model, args.out / name)
    train_s = time.time() - t0
    print(f"training took {train_s:.0f}s", flush=True)

    results = evaluate(args.out, args.eval_n)
    print(json.dumps({"train_seconds": round(train_s), "accuracy": results}), flush=True)


if __name__ == "__main__":
    main()
