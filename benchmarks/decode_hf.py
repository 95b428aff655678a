"""The transformers / PEFT side of ``bench_decode_gpu.py``: a Hugging Face ``LlamaForCausalLM``
whose weights are views of a loraplex model's (no second copy of an 8B model), one decode step
over a ``DynamicCache`` of random keys/values at a given context, and PEFT's mixed-adapter
forward (``adapter_names``)."""

from __future__ import annotations

import warnings

import torch

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_config(cfg):
    """A transformers ``LlamaConfig`` of a loraplex ``ModelConfig``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position,
        rms_norm_eps=cfg.rms_norm_eps, rope_theta=cfg.rope.theta,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=1, eos_token_id=2)


def weight_views(model, cfg) -> dict[str, torch.Tensor]:
    """HF parameter name -> a view of the loraplex model's storage (q/k/v and gate/up are row
    slices of the fused weights). Take them before an engine wraps the projections."""
    params = dict(model.named_parameters(remove_duplicate=False))  # tied lm_head too
    out = {n: params[n] for n in ("model.embed_tokens.weight", "model.norm.weight",
                                  "lm_head.weight")}
    q, kv, i = cfg.q_size, cfg.kv_size, cfg.intermediate_size
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        qkv = params[p + "self_attn.qkv_proj.weight"]
        gate_up = params[p + "mlp.gate_up_proj.weight"]
        out |= {p + "self_attn.q_proj.weight": qkv[:q], p + "self_attn.k_proj.weight":
                qkv[q:q + kv], p + "self_attn.v_proj.weight": qkv[q + kv:],
                p + "mlp.gate_proj.weight": gate_up[:i], p + "mlp.up_proj.weight": gate_up[i:]}
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight", "post_attention_layernorm.weight"):
            out[p + name] = params[p + name]
    return out


def build_hf(cfg, views: dict[str, torch.Tensor], device: torch.device):
    """An HF LlamaForCausalLM built on the meta device, every parameter set to ``views``."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hcfg = hf_config(cfg)
    with torch.device("meta"):
        hf = LlamaForCausalLM(hcfg)
    for name, tensor in views.items():
        mod_name, _, attr = name.rpartition(".")
        mod = hf.get_submodule(mod_name)
        mod._parameters[attr] = torch.nn.Parameter(tensor, requires_grad=False)
    if cfg.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    with torch.device(device):  # its inv_freq buffer was made on meta
        hf.model.rotary_emb = LlamaRotaryEmbedding(config=hcfg)
    missing = [n for n, p in hf.named_parameters() if p.is_meta]
    assert not missing, missing
    return hf.eval()


def add_peft_adapters(hf, n: int, rank: int, dtype: torch.dtype):
    """Wrap ``hf`` with ``n`` random rank-``rank`` PEFT adapters on all seven projections."""
    from peft import LoraConfig, get_peft_model

    def config():
        return LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(PROJS),
                          init_lora_weights=False, lora_dropout=0.0)

    torch.manual_seed(0)
    pm = get_peft_model(hf, config(), adapter_name="lora0", autocast_adapter_dtype=False)
    for i in range(1, n):
        pm.add_adapter(f"lora{i}", config())
    for name, p in pm.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(dtype)
    return pm.eval()


def random_cache(cfg, batch: int, context: int, device, dtype):
    """A DynamicCache holding ``context`` random keys/values per sequence in every layer."""
    from transformers import DynamicCache

    cache = DynamicCache()
    shape = (batch, cfg.num_kv_heads, context, cfg.head_dim)
    for layer in range(cfg.num_layers):
        k = torch.randn(shape, device=device, dtype=dtype)
        cache.update(k, torch.randn_like(k), layer)
    return cache


@torch.inference_mode()
def decode_step(model, cache, context: int, batch: int, greedy: bool,
                adapter_names: list[str] | None, device) -> torch.Tensor:
    """One HF decode step: a token per sequence at position ``context``, then sampling (argmax,
    or temperature 0.8 + top-p 0.95 as transformers' logits warpers do); the cache is cropped
    back so every step sees the same context."""
    ids = torch.full((batch, 1), 5, dtype=torch.int64, device=device)
    pos = torch.full((batch, 1), context, dtype=torch.int64, device=device)
    kw = {} if adapter_names is None else {"adapter_names": adapter_names}
    with warnings.catch_warnings():  # `past_key_values` is renamed `cache` in transformers 5.x
        warnings.simplefilter("ignore", FutureWarning)
        logits = model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True,
                       **kw).logits[:, -1].float()
    cache.crop(-1)  # drop the token just appended (negative: 'remove n' in every version)
    if greedy:
        return logits.argmax(-1)
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopPLogitsWarper,
    )

    scores = TopPLogitsWarper(0.95)(ids, TemperatureLogitsWarper(0.8)(ids, logits))
    return torch.multinomial(torch.softmax(scores, -1), 1)
