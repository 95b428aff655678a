"""Per-request features compose with the scheduler: penalties, logit_bias, min_tokens, a
grammar, logprobs and n, over base and adapter rows, give the same tokens (and logprobs) with
3-token chunks and prefix caching on as in whole-prompt steps without the cache. Each feature
has its own reference test; this one checks the merge of the scheduler with all of them."""

from __future__ import annotations

import torch
from helpers_lora import make_peft_adapter, make_tiny_model

from loraplex import LLM, GuidedParams, SamplingParams


def test_features_are_identical_under_chunks_and_prefix_caching(tmp_path):
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    dirs = {"a": str(make_peft_adapter(hf, tmp_path / "a", seed=1, b_scale=0.5, r=4,
                                       lora_alpha=8))}
    g = torch.Generator().manual_seed(4)
    shared = [1] + torch.randint(4, 120, (33,), generator=g).tolist()  # > 2 blocks
    prompts = [shared + torch.randint(4, 120, (n,), generator=g).tolist() for n in (3, 9, 5)]
    base = dict(max_tokens=9, temperature=0.0, ignore_eos=True)
    requests = [
        (prompts[0], None, SamplingParams(**base, repetition_penalty=1.7, logprobs=2)),
        (prompts[1], "a", SamplingParams(**base, frequency_penalty=1.5, presence_penalty=0.5,
                                         logit_bias={40: 3.0}, prompt_logprobs=1)),
        (prompts[2], "a", SamplingParams(max_tokens=9, temperature=0.0,
                                         guided=GuidedParams(regex="[a-e]{3}x[0-9]+"))),
        (prompts[0], "a", SamplingParams(**base, min_tokens=5, n=2, logprobs=0)),
        (prompts[1], None, SamplingParams(**base)),
    ]

    def run(**kw):
        llm = LLM(str(d), adapters=dirs, device="cpu", max_num_seqs=8, max_lora_rank=8, **kw)
        out = []
        for _ in range(2):  # the second round starts from cached blocks when caching is on
            out.append(llm.generate([p for p, _, _ in requests], [s for _, _, s in requests],
                                    adapters=[a for _, a, _ in requests]))
        return llm, out

    _, want = run(enable_chunked_prefill=False, enable_prefix_caching=False)
    llm, got = run(max_num_batched_tokens=3)
    assert llm.engine.stats()["prefix_cache_hits"] > 0
    for rounds_want, rounds_got in zip(want, got, strict=True):
        assert len(rounds_got) == len(rounds_want) == 6  # n=2 gives two outputs
        for w, o in zip(rounds_want, rounds_got, strict=True):
            assert o.token_ids == w.token_ids and o.text == w.text
            assert o.finish_reason == w.finish_reason
            for lw, lo in (((w.logprobs or []), (o.logprobs or [])),
                           ((w.prompt_logprobs or [])[1:], (o.prompt_logprobs or [])[1:])):
                assert len(lw) == len(lo)
                for a, b in zip(lw, lo, strict=True):
                    assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4
    guided = got[0][2].text
    assert guided[:3] and all(c in "abcde" for c in guided[:3]) and guided[3] == "x"
