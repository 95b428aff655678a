"""Embedding LoRA (``target_modules`` with ``embed_tokens``: PEFT's lora_embedding_A/B) served
per slot in mixed batches with plain and DoRA adapters and base requests: logits and greedy
tokens equal PEFT's. What stays refused is refused by name (lm_head unless enabled, resized
vocabularies, a trained embedding copy)."""

from __future__ import annotations

import pytest
import torch
from helpers_lora import (
    edit_adapter_tensors,
    load_hf_model,
    make_peft_adapter,
    make_tiny_model,
    peft_reference,
)

from loraplex import LLM, AdapterLoadError, SamplingParams
from loraplex.lora.base_weights import CheckpointWeights
from loraplex.lora.peft_loader import load_peft_adapter
from loraplex.models.loader import load_model_config
from loraplex.ops.lora_embedding import _gather_every_token, lora_embedding_shrink
from loraplex.ops.lora_meta import LoRABatch

ADAPTERS = {  # name -> make_peft_adapter kwargs
    "emb_only": dict(r=8, lora_alpha=16, target_modules=["embed_tokens"]),
    "emb_qv": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"]),
    "emb_rs": dict(r=16, lora_alpha=8, use_rslora=True, rank_pattern={"embed_tokens": 2},
                   target_modules=["embed_tokens", "o_proj", "down_proj"]),
    "plain": dict(r=8, lora_alpha=16),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"]),
}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_embedding_lora_mixed_batch_equals_peft(tmp_path, arch):
    overrides = {"tie_word_embeddings": True} if arch == "qwen2" else {}
    d, hf = make_tiny_model(tmp_path / "base", arch, **overrides)
    dirs = {name: make_peft_adapter(hf, tmp_path / name, seed=i, b_scale=0.5, **kw)
            for i, (name, kw) in enumerate(ADAPTERS.items())}
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_loras_per_batch=len(dirs), max_lora_rank=16)
    names = [*dirs, None, "emb_only", None, "emb_qv"]
    g = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(4, 120, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 24, (len(names),), generator=g)]
    scores = llm.score(prompts, adapters=names)
    gens = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                        adapters=names)
    base = load_hf_model(d)
    for ids, name, logits, gen in zip(prompts, names, scores, gens, strict=True):
        ref_model = base if name is None else peft_reference(d, dirs[name])
        x = torch.tensor([ids])
        with torch.no_grad():
            ref_logits = ref_model(input_ids=x).logits[0]
            ref_tokens = ref_model.generate(input_ids=x, max_new_tokens=12, do_sample=False,
                                            eos_token_id=None, min_new_tokens=12)[0, len(ids):]
            base_logits = base(input_ids=x).logits[0]
        err = (logits - ref_logits).abs().max().item()
        assert err <= 1e-4 * ref_logits.abs().max().item(), (name, err)
        assert gen.token_ids == ref_tokens.tolist(), name
        if name is not None:  # the adapter really changes the model
            assert (ref_logits - base_logits).abs().max() > 1e-3, name


@pytest.mark.parametrize("device_path", [False, True])
def test_embedding_shrink_is_one_hot_matmul(device_path):
    g = torch.Generator().manual_seed(0)
    slots_, r_max, vocab = 4, 8, 50
    a = torch.randn(slots_, r_max, vocab, generator=g)
    ranks = torch.tensor([[8], [3], [0], [5]], dtype=torch.int32)
    token_slots = [0, 0, 1, -1, 3, 3, 3, 1, -1, 2]
    ids = torch.randint(0, vocab, (len(token_slots),), generator=g)
    batch = LoRABatch.from_token_slots(token_slots)
    out = torch.full((len(token_slots), r_max), float("nan"))
    if device_path:  # the no-sync path that accelerators take, forced on CPU
        _gather_every_token(ids, a, batch, out)
    else:
        lora_embedding_shrink(ids, a, ranks, batch, out)
    one_hot = torch.nn.functional.one_hot(ids, vocab).float()
    for tok, slot in enumerate(token_slots):
        if slot < 0:
            continue
        r = int(ranks[slot, 0])
        torch.testing.assert_close(out[tok, :r], one_hot[tok] @ a[slot, :r].T)


def test_refusals_name_the_feature(tmp_path):
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    mc, base = load_model_config(d)[0], CheckpointWeights(d).get
    head = make_peft_adapter(hf, tmp_path / "head", r=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterLoadError, match="targets lm_head; serving lm_head LoRA"):
        load_peft_adapter(head, mc, 8, base_weight=base)
    dora_emb = make_peft_adapter(hf, tmp_path / "de", r=4, use_dora=True,
                                 target_modules=["embed_tokens", "q_proj"])
    with pytest.raises(AdapterLoadError, match="DoRA on the embedding is not supported"):
        load_peft_adapter(dora_emb, mc, 8, base_weight=base)

    emb = make_peft_adapter(hf, tmp_path / "emb", r=4, target_modules=["embed_tokens"])
    assert load_peft_adapter(emb, mc, 8, base_weight=base).weights[(-1, "embed_tokens")].rank == 4
    key = "base_model.model.model.embed_tokens.base_layer.weight"

    def trained(ts):
        ts[key] = ts[key] + 0.01
        return ts

    edit_adapter_tensors(emb, trained)
    with pytest.raises(AdapterLoadError, match="differs from the base model's model.embed_tokens"):
        load_peft_adapter(emb, mc, 8, base_weight=base)

    # added tokens: PEFT saves the resized embedding and an A over the larger vocabulary
    big = load_hf_model(d)
    big.resize_token_embeddings(mc.vocab_size + 4)
    resized = make_peft_adapter(big, tmp_path / "resized", r=4, target_modules=["embed_tokens"])
    with pytest.raises(AdapterLoadError, match=r"vocabulary has 132 tokens, the base model's "
                                               r"128; adapters that resize the embeddings"):
        load_peft_adapter(resized, mc, 8, base_weight=base)
