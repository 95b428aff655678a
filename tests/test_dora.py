"""DoRA adapters (``use_dora: true``) served in mixed batches with plain LoRA adapters and base
requests: logits and greedy tokens equal PEFT's (the reference loaded fresh from disk), on a
model without biases (Llama) and one with q/k/v biases (Qwen2)."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers_lora import (
    edit_adapter_config,
    edit_adapter_tensors,
    make_peft_adapter,
    make_tiny_model,
    peft_reference,
)

from loraplex import LLM, AdapterLoadError, SamplingParams
from loraplex.config import ModelConfig
from loraplex.lora.base_weights import CheckpointWeights
from loraplex.lora.peft_loader import load_peft_adapter
from loraplex.models.loader import load_model_config

ADAPTERS = {  # name -> make_peft_adapter kwargs
    "dora8": dict(r=8, lora_alpha=16, use_dora=True),
    "dora_qv": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
    "dora_rs": dict(r=16, lora_alpha=8, use_dora=True, use_rslora=True,
                    target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"]),
    "lora8": dict(r=8, lora_alpha=16),
    "lora_mlp": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]),
}


def perturb_magnitudes(adapter_dir, seed: int) -> None:
    """PEFT initialises the magnitude to ||W + s*B@A||, which makes DoRA equal plain LoRA;
    a trained adapter's differs, so scale each entry by a random factor in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)

    def edit(tensors):
        for k, t in tensors.items():
            if k.endswith("lora_magnitude_vector"):
                tensors[k] = t * (0.5 + torch.rand(t.shape, generator=g))
        return tensors

    edit_adapter_tensors(adapter_dir, edit)


def as_plain_lora(adapter_dir, tmp_path):
    """A copy of a DoRA adapter without DoRA: same A and B, no magnitudes."""
    out = tmp_path / f"{adapter_dir.name}_plain"
    if not out.exists():
        shutil.copytree(adapter_dir, out)
        edit_adapter_config(out, use_dora=False)
        edit_adapter_tensors(out, lambda ts: {k: v for k, v in ts.items()
                                              if not k.endswith("lora_magnitude_vector")})
    return out


def _setup(tmp_path, arch):
    d, hf = make_tiny_model(tmp_path / "base", arch)
    if arch == "qwen2":  # biases are zero at init: make them matter (DoRA subtracts them)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        hf.save_pretrained(d)
    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        dirs[name] = make_peft_adapter(hf, tmp_path / name, seed=i, b_scale=0.5, **kw)
        if kw.get("use_dora"):
            perturb_magnitudes(dirs[name], seed=10 + i)
    return d, dirs


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dora_mixed_batch_equals_peft(tmp_path, arch):
    d, dirs = _setup(tmp_path, arch)
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_loras_per_batch=len(dirs), max_lora_rank=16)
    names = [*dirs, None, "dora8", None, "lora8", "dora_qv"]
    g = torch.Generator().manual_seed(5)
    prompts = [[1] + torch.randint(4, 120, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 24, (len(names),), generator=g)]
    scores = llm.score(prompts, adapters=names)
    gens = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                        adapters=names)
    from helpers_lora import load_hf_model

    base = load_hf_model(d)  # fresh from disk, as are the PEFT references below
    for ids, name, logits, gen in zip(prompts, names, scores, gens, strict=True):
        ref_model = base if name is None else peft_reference(d, dirs[name])
        x = torch.tensor([ids])
        with torch.no_grad():
            ref_logits = ref_model(input_ids=x).logits[0]
            ref_tokens = ref_model.generate(input_ids=x, max_new_tokens=12, do_sample=False,
                                            eos_token_id=None, min_new_tokens=12)[0, len(ids):]
        _assert_close(logits, ref_logits)
        assert gen.token_ids == ref_tokens.tolist(), name
        if name is not None and name.startswith("dora"):
            # DoRA really differs from the same A/B served as plain LoRA
            with torch.no_grad():
                plain = peft_reference(d, as_plain_lora(dirs[name], tmp_path))(input_ids=x)
            assert (plain.logits[0] - ref_logits).abs().max() > 1e-3, name


def _mc(model_dir) -> ModelConfig:
    return load_model_config(model_dir)[0]


def test_dora_load_errors_name_the_tensor(tmp_path):
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    mc, base = _mc(d), CheckpointWeights(d).get
    dora = make_peft_adapter(hf, tmp_path / "dora", r=4, use_dora=True, target_modules=["q_proj"])
    # without the base weights (a bare parse): refused by name
    with pytest.raises(AdapterLoadError, match="use_dora=True: DoRA needs the base model"):
        load_peft_adapter(dora, mc, 8)
    assert load_peft_adapter(dora, mc, 8, base_weight=base).uses_dora

    def drop_magnitude(tensors):
        del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector"]
        return tensors

    edit_adapter_tensors(dora, drop_magnitude)
    with pytest.raises(AdapterLoadError, match=r"layers\.1\.self_attn\.q_proj\.lora_magnitude"):
        load_peft_adapter(dora, mc, 8, base_weight=base)

    dora2 = make_peft_adapter(hf, tmp_path / "dora2", r=4, use_dora=True, target_modules=["v_proj"])
    edit_adapter_config(dora2, use_dora=False)  # magnitudes present, DoRA switched off
    with pytest.raises(AdapterLoadError, match="DoRA magnitude, but adapter_config.json has "
                                               "use_dora=false"):
        load_peft_adapter(dora2, mc, 8, base_weight=base)

    dora3 = make_peft_adapter(hf, tmp_path / "dora3", r=4, use_dora=True, target_modules=["o_proj"])
    with pytest.raises(AdapterLoadError, match=r"base weight 'model\.layers\.0\.self_attn\.o_proj"):
        load_peft_adapter(dora3, mc, 8, base_weight=lambda name: None)


def test_dora_slot_reuse_resets_column_scales(tmp_path):
    """One slot, DoRA then plain LoRA then DoRA again: each gets its own outputs (a plain
    adapter written over a DoRA slot must not inherit its column scales)."""
    d, dirs = _setup(tmp_path, "llama")
    llm = LLM(str(d), adapters={k: str(dirs[k]) for k in ("dora8", "lora8")}, device="cpu",
              max_loras_per_batch=1, max_lora_rank=16)
    prompt = [[1, 17, 23, 40, 9]]
    first = [llm.score(prompt, adapters=name)[0] for name in ("dora8", "lora8", "dora8", None)]
    for name, ours in zip(("dora8", "lora8"), first, strict=False):
        with torch.no_grad():
            ref = peft_reference(d, dirs[name])(input_ids=torch.tensor(prompt)).logits[0]
        _assert_close(ours, ref)
    assert torch.equal(first[0], first[2])
