"""Qwen3, Gemma 2, Gemma 3 (text), Phi-3 and windowed Mistral against transformers and PEFT:
tiny random models built with the real transformers config classes (GQA, sliding windows
shorter than the prompts, norms and biases made to matter), mixed batches of PEFT adapters
and base requests through ``LLM``: logits of every position (prefill) within 1e-4 relative,
and identical greedy tokens (decode over the paged cache, past the window)."""

from __future__ import annotations

import pytest
import torch
from helpers_lora import BOS, EOS, PAD, make_peft_adapter, make_tokenizer, peft_reference

from loraplex import LLM, SamplingParams
from loraplex.config import ModelConfig

SHAPE = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, num_hidden_layers=3,
             intermediate_size=160, vocab_size=128, max_position_embeddings=256,
             bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
WINDOW = 7  # shorter than every long prompt below, and than prompt + generated tokens
SPLIT = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FUSED = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def _config(arch: str):
    import transformers as tf

    if arch == "qwen3":
        return tf.Qwen3Config(**SHAPE, head_dim=24)  # head_dim != hidden / heads
    if arch == "gemma2":
        return tf.Gemma2Config(**SHAPE, head_dim=16, sliding_window=WINDOW,
                               query_pre_attn_scalar=24, attn_logit_softcapping=4.0,
                               final_logit_softcapping=2.5)
    if arch == "gemma3":
        rope = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0,
                                   "rope_theta": 1000000.0}}
        return tf.Gemma3TextConfig(**SHAPE, head_dim=16, sliding_window=WINDOW,
                                   query_pre_attn_scalar=24, rope_parameters=rope,
                                   layer_types=["sliding_attention", "full_attention",
                                                "sliding_attention"])
    if arch == "phi3":
        return tf.Phi3Config(**SHAPE, sliding_window=WINDOW)
    if arch == "mistral":
        return tf.MistralConfig(**SHAPE, sliding_window=WINDOW)
    raise ValueError(arch)


def _build(tmp_path, arch: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_config(arch)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms start at 1 (or 0 for Gemma's 1 + w): make them matter
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    d = tmp_path / arch
    hf.save_pretrained(d)
    make_tokenizer(d)
    return d, hf


def _adapters(tmp_path, hf, arch: str) -> dict:
    projs = FUSED if arch == "phi3" else SPLIT
    kinds = {
        # PEFT's "all-linear" names the fused projections on Phi-3
        "all": dict(r=8, lora_alpha=16,
                    target_modules="all-linear" if arch in ("phi3", "gemma3") else projs),
        "attn": dict(r=4, lora_alpha=4, target_modules=projs[:2] if arch == "phi3"
                     else ["q_proj", "v_proj", "o_proj"]),
        "mlp": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=projs[-2:]),
    }
    return {name: make_peft_adapter(hf, tmp_path / f"{arch}-{name}", seed=i + 3, b_scale=0.5,
                                    **kw)
            for i, (name, kw) in enumerate(kinds.items())}


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err


@pytest.mark.parametrize("arch", ["qwen3", "gemma2", "gemma3", "phi3", "mistral"])
def test_mixed_adapters_match_transformers_and_peft(tmp_path, arch):
    d, hf = _build(tmp_path, arch)
    dirs = _adapters(tmp_path, hf, arch)
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_loras_per_batch=4, max_lora_rank=16)
    names = ["all", None, "attn", "mlp", "all", None]
    g = torch.Generator().manual_seed(7)
    lengths = [23, 3, 40, 17, 9, 31]  # most longer than the window; 1 + 3 share a length group
    prompts = [torch.randint(4, 120, (n,), generator=g).tolist() for n in lengths]
    scores = llm.score(prompts, adapters=names)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    gens = llm.generate(prompts, sp, adapters=names)
    refs = {name: peft_reference(hf, path) for name, path in dirs.items()}
    for ids, name, logits, gen in zip(prompts, names, scores, gens, strict=True):
        model = hf if name is None else refs[name]
        x = torch.tensor([ids])
        with torch.no_grad():
            ref_logits = model(input_ids=x).logits[0]
            ref_tokens = model.generate(input_ids=x, max_new_tokens=12, do_sample=False,
                                        eos_token_id=None, min_new_tokens=12)[0, len(ids):]
            if name is not None:  # the adapter really changes the model
                assert (ref_logits - hf(input_ids=x).logits[0]).abs().max() > 1e-3
        _assert_close(logits, ref_logits)
        assert gen.token_ids == ref_tokens.tolist(), (arch, name)


@pytest.mark.parametrize("arch", ["gemma2", "mistral"])
def test_windows_and_softcap_hold_in_chunked_prefill_and_prefix_hits(tmp_path, arch):
    """Chunks of 5 tokens (budget 5) and a second round served from the prefix cache attend
    over the cache through the extend op: the window and softcap must apply there too."""
    d, hf = _build(tmp_path, arch)
    dirs = _adapters(tmp_path, hf, arch)
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_loras_per_batch=4, max_lora_rank=16, max_num_batched_tokens=5)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 120, (n,), generator=g).tolist() for n in (23, 40)]
    names = [None, "all"]
    sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    refs = {name: peft_reference(hf, path) for name, path in dirs.items()}
    for _ in range(2):  # the second round starts from cached blocks
        gens = llm.generate(prompts, sp, adapters=names)
        for ids, name, gen in zip(prompts, names, gens, strict=True):
            model = hf if name is None else refs[name]
            with torch.no_grad():
                ref = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8,
                                     do_sample=False, eos_token_id=None, min_new_tokens=8)
            assert gen.token_ids == ref[0, len(ids):].tolist(), (arch, name)
    assert llm.engine.stats()["prefix_cache_hits"] > 0


@pytest.mark.parametrize("arch", ["gemma2", "mistral"])
def test_window_matters(tmp_path, arch):
    """The references above differ from full-context attention past the window, so the
    parity test exercises the window (and the context is not capped at it)."""
    from transformers import AutoModelForCausalLM

    d, hf = _build(tmp_path, arch)
    full_cfg = _config(arch)
    full_cfg.sliding_window = 10_000  # wider than any context here: full attention
    full = AutoModelForCausalLM.from_config(full_cfg).eval()
    full.load_state_dict(hf.state_dict())
    ids = torch.tensor([list(range(4, 44))])
    with torch.no_grad():
        windowed, plain = hf(ids).logits[0], full(ids).logits[0]
    assert torch.allclose(windowed[:WINDOW], plain[:WINDOW], atol=1e-5)
    assert (windowed[WINDOW:] - plain[WINDOW:]).abs().max() > 1e-3
    llm = LLM(str(d), device="cpu")
    assert llm.engine.max_model_len == 256  # the model's context, not the window
    _assert_close(llm.score(ids.tolist())[0], windowed)


def test_config_fields():
    gemma3 = ModelConfig.from_hf(_config("gemma3"))
    assert [gemma3.layer_window(i) for i in range(3)] == [WINDOW, None, WINDOW]
    assert gemma3.layer_rope(0).theta == 10000.0 and gemma3.local_rope is not None
    assert gemma3.layer_rope(1).scaling_type == "linear" and gemma3.layer_rope(1).factor == 4.0
    assert gemma3.hidden_act == "gelu_pytorch_tanh" and gemma3.query_pre_attn_scalar == 24
    gemma2 = ModelConfig.from_hf(_config("gemma2"))
    assert (gemma2.attn_logit_softcap, gemma2.final_logit_softcap) == (4.0, 2.5)
    mistral = ModelConfig.from_hf(_config("mistral"))
    assert [mistral.layer_window(i) for i in range(3)] == [WINDOW] * 3
    qwen3 = ModelConfig.from_hf(_config("qwen3"))
    assert qwen3.sliding_window is None and not qwen3.attention_bias and qwen3.head_dim == 24
    phi3_hf = _config("phi3")
    phi3_hf.architectures = ["Phi3ForCausalLM"]  # as save_pretrained writes it
    phi3 = ModelConfig.from_hf(phi3_hf)
    assert phi3.checkpoint_projs()["qkv_proj"] == ("q_proj", "k_proj", "v_proj")


def test_unsupported_activation_is_a_clear_error(tmp_path):
    from helpers_lora import make_tiny_model

    from loraplex import ModelLoadError

    d, _ = make_tiny_model(tmp_path / "gelu", "llama", hidden_act="gelu")
    with pytest.raises(ModelLoadError, match="hidden_act='gelu'"):
        LLM(str(d), device="cpu")
