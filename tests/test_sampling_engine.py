"""Sampling inside the engine: one request's non-finite logits end that request alone
(finish_reason "error"), its KV blocks and adapter pin are freed, and every other request in
the step produces exactly the tokens it produces without it."""

from __future__ import annotations

import pytest
import torch
from helpers_lora import make_peft_adapter, make_tiny_model

from loraplex import LLM, SamplingParams


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    root = tmp_path_factory.mktemp("poison")
    d, hf = make_tiny_model(root / "base", "llama")
    good = make_peft_adapter(hf, root / "good", seed=1, r=4)
    bad = make_peft_adapter(hf, root / "bad", seed=2, r=4, b_scale=1e30)  # finite, huge
    return d, {"good": str(good), "bad": str(bad)}


def _bystanders(n: int = 15):
    g = torch.Generator().manual_seed(5)
    prompts = [[1] + torch.randint(4, 120, (int(k),), generator=g).tolist()
               for k in torch.randint(3, 30, (n,), generator=g)]
    kinds = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
             SamplingParams(max_tokens=12, temperature=0.8, seed=11, ignore_eos=True),
             SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, top_k=20, min_p=0.05,
                            seed=12, ignore_eos=True)]
    params = [kinds[i % 3] for i in range(n)]
    adapters = [[None, "good"][i % 2] for i in range(n)]
    return prompts, params, adapters


def test_poisoned_request_ends_alone_with_an_error(poisoned):
    d, adapters = poisoned
    llm = LLM(str(d), adapters=adapters, device="cpu", max_num_seqs=16, max_lora_rank=8)
    bad_prompt = [1, 7, 8, 9]
    assert not torch.isfinite(llm.score([bad_prompt], adapters="bad")[0]).all()  # precondition
    prompts, params, names = _bystanders()
    clean = [o.token_ids for o in llm.generate(prompts, params, names)]
    sp = SamplingParams(max_tokens=12, temperature=0.7, seed=3)
    mixed = llm.generate(prompts[:7] + [bad_prompt] + prompts[7:], params[:7] + [sp] + params[7:],
                         names[:7] + ["bad"] + names[7:])
    hurt = mixed.pop(7)
    assert hurt.finished and hurt.finish_reason == "error" and hurt.token_ids == []
    assert "non-finite logits" in hurt.error and "'bad'" in hurt.error
    assert [o.token_ids for o in mixed] == clean
    assert all(o.finish_reason == "length" and o.error is None for o in mixed)
    engine = llm.engine
    assert not engine.has_unfinished_requests() and not engine.requests
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.stats()["num_pinned_slots"] == 0
    # the freed blocks (which held its NaN keys/values) serve later requests unharmed
    again = llm.generate(prompts, params, names)
    assert [o.token_ids for o in again] == clean


def test_poisoned_request_during_decode_and_greedy(poisoned):
    """Greedy poisoned row (argmax path) among decoding bystanders."""
    d, adapters = poisoned
    llm = LLM(str(d), adapters=adapters, device="cpu", max_num_seqs=16, max_lora_rank=8)
    prompts, params, names = _bystanders(5)
    clean = [o.token_ids for o in llm.generate(prompts, params, names)]
    engine = llm.engine
    for i, (p, sp, a) in enumerate(zip(prompts, params, names)):
        engine.add_request(f"ok{i}", p, sp, a)
    engine.step()  # prefill of the bystanders
    engine.add_request("bad", [1, 2, 3], SamplingParams(max_tokens=5, temperature=0), "bad")
    outs: dict[str, object] = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outs[o.request_id] = o
    assert outs["bad"].finish_reason == "error" and "non-finite" in outs["bad"].error
    assert [outs[f"ok{i}"].token_ids for i in range(5)] == clean
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_unseeded_requests_get_distinct_seeds_and_seeded_ones_repeat(poisoned):
    d, _ = poisoned
    llm = LLM(str(d), device="cpu")
    sp = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    a, b = llm.generate([[1, 5, 6], [1, 5, 6]], sp)
    assert a.token_ids != b.token_ids  # same prompt, two fresh seeds
    seeded = SamplingParams(max_tokens=16, temperature=1.0, seed=77, ignore_eos=True)
    x = llm.generate([[1, 5, 6]], seeded)[0]
    y = llm.generate([[1, 9], [1, 4, 4, 4], [1, 5, 6]], [sp, sp, seeded])[2]
    assert x.token_ids == y.token_ids


def test_tiny_sampling_values_are_refused_before_they_reach_the_engine(poisoned):
    """temperature / top_p of 1e-300 used to pass validation, underflow to 0 in float32 and
    make step() raise for every request in the step."""
    for kwargs in ({"temperature": 1e-300}, {"top_p": 1e-300}, {"temperature": 1e-30}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SamplingParams(**kwargs)
