"""Test helpers: tiny random Hugging Face models and real PEFT adapters, built offline.

Everything is deterministic (seeded) and small enough to build in well under a second once
transformers is imported. Typical use::

    model_dir, hf_model = make_tiny_model(tmp_path / "model")
    sql = make_peft_adapter(hf_model, tmp_path / "sql", seed=1, r=8, lora_alpha=16)
    ref = peft_reference(hf_model, sql)    # a PeftModel to compare outputs against

``make_peft_adapter`` never modifies the model it is given (PEFT wraps a deep copy).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ALL_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Small Llama-family shape with grouped-query attention (6 heads, 2 kv heads, head_dim 16).
TINY_SHAPE = dict(
    hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=3,
    intermediate_size=160, vocab_size=128, max_position_embeddings=256,
)
UNK, BOS, EOS, PAD = 0, 1, 2, 3
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
# Merges give multi-character tokens, so detokenization is exercised beyond single chars.
_MERGES = [("t", "h"), ("h", "e"), ("i", "n"), (" ", "t"), ("e", "r"), ("a", "n"), ("o", "n"),
           ("r", "e"), ("e", "s"), (" ", "a"), ("th", "e"), (" t", "he"), ("in", "g"),
           ("e", "n"), ("o", "r"), ("a", "t"), (" ", "s"), ("e", "d")]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _config_class(arch: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}
    if arch not in classes:
        raise ValueError(f"arch={arch!r} must be one of {sorted(classes)}")
    return classes[arch]


def tiny_hf_config(arch: str = "llama", **overrides):
    """A transformers config of the tiny shape; ``overrides`` are config fields
    (e.g. ``num_hidden_layers=2``, ``tie_word_embeddings=True``, ``rope_parameters={...}``)."""
    fields = dict(TINY_SHAPE, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if arch == "mistral":
        fields["sliding_window"] = None  # tiny contexts; enable explicitly to test it
    fields.update(overrides)
    return _config_class(arch)(**fields)


def make_tokenizer(out_dir: str | os.PathLike, vocab_size: int = 128):
    """Save a character-level BPE tokenizer (printable ASCII + newline + a few merges) that
    ``AutoTokenizer.from_pretrained(out_dir)`` loads offline.

    Ids: ``<unk>``=0, ``<s>``=1 (bos, prepended by encode), ``</s>``=2 (eos), ``<pad>``=3.
    Characters outside the alphabet encode to ``<unk>``. Uses at most ``vocab_size`` ids.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    tokens = _SPECIALS + chars + [a + b for a, b in _MERGES]
    if len(tokens) > vocab_size:
        raise ValueError(f"the tokenizer needs {len(tokens)} ids, vocab_size={vocab_size}")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES), unk_token="<unk>"))
    tok.add_special_tokens(_SPECIALS)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_model(
    out_dir: str | os.PathLike,
    arch: str = "llama",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tokenizer: bool = True,
    **overrides,
):
    """Build a seeded random ``*ForCausalLM`` and save it (config.json, model.safetensors and
    a tokenizer) to ``out_dir``. Returns ``(out_dir, hf_model)``; the model is in eval mode,
    float32 in memory; ``dtype`` is the dtype written to disk (and recorded in config.json).
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    cfg = tiny_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if dtype == torch.float32:
        model.save_pretrained(out_dir)
    else:
        # save a casted copy: the returned model stays float32 for reference computations
        copy.deepcopy(model).to(dtype).save_pretrained(out_dir)
    if tokenizer:
        make_tokenizer(out_dir, vocab_size=cfg.vocab_size)
    return out_dir, model


def load_hf_model(model_dir: str | os.PathLike):
    """Load a saved tiny model in float32, eval mode (the transformers reference)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def make_peft_adapter(
    model_dir_or_model,
    out_dir: str | os.PathLike,
    seed: int = 0,
    r: int = 8,
    lora_alpha: float = 16,
    target_modules: list[str] | str = ALL_PROJS,
    use_rslora: bool = False,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
    layers_to_transform: list[int] | int | None = None,
    b_scale: float = 1.0,
    safe_serialization: bool = True,
    **lora_kwargs,
) -> Path:
    """Make a real PEFT LoRA adapter for a tiny model and ``save_pretrained`` it to ``out_dir``.

    Both A and B are random (``init_lora_weights=False``), seeded by ``seed``, so the adapter
    changes the model's outputs; ``b_scale`` multiplies every B to make that change smaller
    or larger. ``safe_serialization=False`` writes ``adapter_model.bin``. Other
    ``LoraConfig`` fields pass through ``lora_kwargs``. Returns ``Path(out_dir)``.
    """
    from peft import LoraConfig, get_peft_model

    base = model_dir_or_model
    if isinstance(base, (str, os.PathLike)):
        base = load_hf_model(base)
    base = copy.deepcopy(base)  # get_peft_model wraps modules in place
    config = LoraConfig(
        r=r, lora_alpha=lora_alpha,
        target_modules=list(target_modules) if not isinstance(target_modules, str)
        else target_modules,
        use_rslora=use_rslora, rank_pattern=rank_pattern or {},
        alpha_pattern=alpha_pattern or {}, layers_to_transform=layers_to_transform,
        init_lora_weights=False, lora_dropout=0.0, **lora_kwargs,
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(base, config)
    if b_scale != 1.0:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if ".lora_B." in name:
                    p.mul_(b_scale)
    out_dir = Path(out_dir)
    peft_model.save_pretrained(str(out_dir), safe_serialization=safe_serialization)
    return out_dir


def peft_reference(model_dir_or_model, adapter_dir: str | os.PathLike):
    """``PeftModel.from_pretrained`` on a copy of the base model: the reference to compare
    loraplex's adapted outputs (and loaded weights) against. Eval mode, float32."""
    from peft import PeftModel

    base = model_dir_or_model
    if isinstance(base, (str, os.PathLike)):
        base = load_hf_model(base)
    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()


def peft_lora_modules(
    peft_model,
) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, float]]:
    """``(layer, proj) -> (A [r, in], B [out, r], scaling)`` read from a PeftModel's own
    LoRA layers (adapter ``default``), for every module PEFT wrapped."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            parts = name.split(".")
            layer = int(parts[parts.index("layers") + 1])
            out[(layer, parts[-1])] = (
                module.lora_A["default"].weight.detach().float(),
                module.lora_B["default"].weight.detach().float(),
                float(module.scaling["default"]),
            )
    return out


# -- hand-editing saved adapters (for malformed-adapter tests) ----------------------------
def edit_adapter_config(adapter_dir: str | os.PathLike, **changes) -> dict:
    """Update fields of ``adapter_config.json`` in place; a value of ``None`` is written as
    JSON null. Returns the new config."""
    path = Path(adapter_dir) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))
    return cfg


def edit_adapter_tensors(
    adapter_dir: str | os.PathLike,
    fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> None:
    """Rewrite ``adapter_model.safetensors`` as ``fn(tensors)`` (``fn`` may edit in place
    and return the same dict)."""
    path = Path(adapter_dir) / "adapter_model.safetensors"
    tensors = fn(load_file(str(path)))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
