"""Chunked prefill and prefix caching through the engine: greedy fp32 outputs must not depend
on how prompts are chunked, on what the prefix cache served, or on preemption; each adapter's
cached path equals PEFT's; adapters never read each other's blocks."""

from __future__ import annotations

import pytest
import torch
from helpers_lora import make_peft_adapter, make_tiny_model, peft_reference

from loraplex import LLM, SamplingParams

SP = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
BLOCK = 16  # CacheConfig's default block size


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chunked")
    d, hf = make_tiny_model(tmp / "base", "llama")
    dirs = {n: make_peft_adapter(hf, tmp / n, seed=i + 1, r=4, b_scale=0.5)
            for i, n in enumerate(("a", "b"))}
    return d, hf, {k: str(v) for k, v in dirs.items()}


def _prompts() -> list[list[int]]:
    """Lengths around block boundaries; the last three share a 33-token prefix."""
    g = torch.Generator().manual_seed(3)
    shared = torch.randint(4, 120, (33,), generator=g).tolist()
    out = [torch.randint(4, 120, (n,), generator=g).tolist() for n in (5, 17)]
    return out + [shared + torch.randint(4, 120, (n,), generator=g).tolist() for n in (1, 15, 2)]


def _llm(setup, **kw) -> LLM:
    d, _, dirs = setup
    return LLM(str(d), adapters=dirs, device="cpu", max_loras_per_batch=2, max_lora_rank=8,
               num_kv_blocks=kw.pop("num_kv_blocks", 96), **kw)


ADAPTERS = ["a", None, "a", "a", "b"]


@pytest.fixture(scope="module")
def baseline(setup):
    llm = _llm(setup, enable_prefix_caching=False, enable_chunked_prefill=False)
    return [o.token_ids for o in llm.generate(_prompts(), SP, ADAPTERS)]


@pytest.mark.parametrize("caching", [True, False])
@pytest.mark.parametrize("budget", [1, 7, 16, 64, None])
def test_greedy_identical_over_chunk_budgets_and_prefix_caching(setup, baseline, caching,
                                                                  budget):
    kw = {"enable_chunked_prefill": False} if budget is None else {
        "max_num_batched_tokens": budget}
    llm = _llm(setup, enable_prefix_caching=caching, **kw)
    first = llm.generate(_prompts(), SP, ADAPTERS)
    again = llm.generate(_prompts(), SP, ADAPTERS)  # now served from the cache, when on
    assert [o.token_ids for o in first] == baseline
    assert [o.token_ids for o in again] == baseline
    cached = [o.num_cached_tokens for o in again]
    if caching:  # every full block before the last token, e.g. 16 of 17, 32 of 34
        assert cached == [(len(p) - 1) // BLOCK * BLOCK for p in _prompts()]
        # "a" runs the 33-token prefix twice in the first call: the second run shares it
        assert first[3].num_cached_tokens == 32
    else:
        assert cached == [0] * len(cached)
    blocks = llm.engine.blocks
    assert sum(blocks.ref_counts) == 0 and blocks.num_free == blocks.num_blocks


def test_adapters_sharing_a_prompt_never_share_blocks_and_match_peft(setup):
    d, hf, dirs = setup
    llm = _llm(setup, max_num_batched_tokens=16)
    prompt = _prompts()[-2]  # 48 tokens: 2 full blocks before the last token
    sp = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], sp, ["a"])
    outs = llm.generate([prompt] * 3, sp, ["a", "b", None])
    assert [o.num_cached_tokens for o in outs] == [32, 0, 0]
    outs += llm.generate([prompt] * 3, sp, ["a", "b", None])  # each from its own blocks
    assert [o.num_cached_tokens for o in outs[3:]] == [32, 32, 32]
    x = torch.tensor([prompt])
    for out, name in zip(outs, ["a", "b", None] * 2, strict=True):
        ref_model = hf if name is None else peft_reference(hf, dirs[name])
        with torch.no_grad():
            ref = ref_model.generate(input_ids=x, max_new_tokens=8, do_sample=False,
                                     eos_token_id=None, min_new_tokens=8)[0, len(prompt):]
        assert out.token_ids == ref.tolist(), name


def test_n_choices_share_the_prompt_blocks(setup):
    llm = _llm(setup, max_num_batched_tokens=64)
    prompt = _prompts()[-1]
    outs = llm.generate([prompt] * 4, SP, ["a"] * 4)  # as LLM fans out n = 4
    assert sorted(o.num_cached_tokens for o in outs) == [0, 32, 32, 32]
    assert len({tuple(o.token_ids) for o in outs}) == 1


@pytest.mark.parametrize("chunked", [True, False])
def test_preemption_with_a_tiny_kv_cache(setup, baseline, chunked):
    sp = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm = _llm(setup, num_kv_blocks=6, max_num_batched_tokens=32,
               enable_chunked_prefill=chunked)
    outs = llm.generate(_prompts(), sp, ADAPTERS)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == baseline
    assert sum(llm.engine.lora_pool.pins) == 0 and sum(llm.engine.blocks.ref_counts) == 0


def test_unload_drops_the_generation_from_the_cache(setup):
    d, _, dirs = setup
    llm = _llm(setup)
    prompt = _prompts()[-1]
    llm.generate([prompt], SP, ["a"])
    assert llm.generate([prompt], SP, ["a"])[0].num_cached_tokens == 32
    llm.unload_adapter("a")
    assert len(llm.engine.blocks.cache) == 0  # only "a" had cached blocks
    llm.load_adapter("a", dirs["a"])  # a new generation: recomputed
    assert llm.generate([prompt], SP, ["a"])[0].num_cached_tokens == 0
