"""Logprobs of generated and prompt tokens equal ``log_softmax`` of ``LLM.score()``'s logits
(fp32, within 1e-5) for every adapter of a mixed batch; ``max_tokens=0`` scores a prompt;
``n`` / ``best_of`` rank candidates by cumulative logprob."""

from __future__ import annotations

import pytest
import torch
from helpers_lora import make_peft_adapter, make_tiny_model

from loraplex import LLM, SamplingParams

ADAPTERS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=8, lora_alpha=16,
                                                     target_modules=["q_proj", "down_proj"])}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    d, hf = make_tiny_model(root / "base", "llama")
    dirs = {n: str(make_peft_adapter(hf, root / n, seed=i + 1, b_scale=0.5, **kw))
            for i, (n, kw) in enumerate(ADAPTERS.items())}
    return LLM(str(d), adapters=dirs, device="cpu", max_num_seqs=16, max_lora_rank=8)


def _prompts(n: int, seed: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[1] + torch.randint(4, 120, (int(k),), generator=g).tolist()
            for k in torch.randint(2, 20, (n,), generator=g)]


def _check_entry(entry, token: int, ref_lp: torch.Tensor, k: int) -> None:
    """One TokenLogprobs against a reference log_softmax row."""
    assert entry.token_id == token
    assert abs(entry.logprob - ref_lp[token].item()) <= 1e-5
    assert entry.rank == 1 + int((ref_lp > ref_lp[token]).sum())
    top = ref_lp.topk(k)
    assert [t for t, _ in entry.top] == top.indices.tolist()
    assert torch.allclose(torch.tensor([v for _, v in entry.top]), top.values, atol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logprobs_equal_log_softmax_of_score_per_adapter(llm, temperature):
    names = [None, "a", "b", "a", None, "b", "b", "a"]
    prompts = _prompts(len(names))
    ks = [0, 1, 5, 3, 2, 5, 0, 4]
    params = [SamplingParams(max_tokens=7, temperature=temperature, seed=i, ignore_eos=True,
                             logprobs=k, prompt_logprobs=k) for i, k in enumerate(ks)]
    params[6] = SamplingParams(max_tokens=7, temperature=temperature, ignore_eos=True)  # no ask
    outs = llm.generate(prompts, params, adapters=names)
    full = [p + o.token_ids[:-1] for p, o in zip(prompts, outs)]
    scores = llm.score(full, adapters=names)
    for prompt, out, k, name, logits, sp in zip(prompts, outs, ks, names, scores, params):
        ref = torch.log_softmax(logits, dim=-1)
        if sp.logprobs is None:
            assert out.logprobs is None and out.prompt_logprobs is None
            assert out.cumulative_logprob is None
            continue
        assert len(out.logprobs) == len(out.token_ids) == 7, name
        for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            _check_entry(entry, tok, ref[len(prompt) - 1 + j], k)
            if temperature == 0:
                assert entry.rank == 1  # greedy took the most likely token
        assert out.cumulative_logprob == pytest.approx(sum(e.logprob for e in out.logprobs))
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for i in range(1, len(prompt)):
            _check_entry(out.prompt_logprobs[i], prompt[i], ref[i - 1], k)


def test_max_tokens_zero_scores_the_prompt_only(llm):
    prompts = _prompts(3, seed=9)
    names = ["a", None, "b"]
    sp = SamplingParams(max_tokens=0, prompt_logprobs=1)
    outs = llm.generate(prompts, [sp, sp, SamplingParams(max_tokens=3, temperature=0)],
                        adapters=names)
    scores = llm.score(prompts, adapters=names)
    for prompt, out, logits in zip(prompts[:2], outs, scores):
        assert out.token_ids == [] and out.text == "" and out.finish_reason == "length"
        ref = torch.log_softmax(logits, dim=-1)
        got = torch.tensor([e.logprob for e in out.prompt_logprobs[1:]])
        want = ref[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        assert torch.allclose(got, want, atol=1e-5)
    assert len(outs[2].token_ids) == 3  # a neighbour in the same batch runs normally
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)


def test_best_of_returns_the_n_candidates_with_highest_cumulative_logprob(llm):
    prompt = _prompts(1, seed=3)[0]
    sp = SamplingParams(n=2, best_of=5, temperature=1.0, seed=40, max_tokens=6,
                        ignore_eos=True)
    outs = llm.generate([prompt, prompt], [sp, SamplingParams(max_tokens=2)], adapters="a")
    assert len(outs) == 3  # 2 for the first prompt, then 1
    best = outs[:2]
    singles = llm.generate([prompt] * 5, [
        SamplingParams(temperature=1.0, seed=40 + i, max_tokens=6, ignore_eos=True, logprobs=0)
        for i in range(5)], adapters="a")
    ranked = sorted(singles, key=lambda o: o.cumulative_logprob, reverse=True)
    assert [o.token_ids for o in best] == [o.token_ids for o in ranked[:2]]
    assert [o.cumulative_logprob for o in best] == pytest.approx(
        [o.cumulative_logprob for o in ranked[:2]])
    assert all(o.logprobs is None for o in best)  # not asked for: used for ranking only
    assert len({tuple(o.token_ids) for o in singles}) > 1  # candidates really differ


def test_n_without_best_of_keeps_draw_order(llm):
    prompt = _prompts(1, seed=4)[0]
    outs = llm.generate([prompt], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=5,
                                                 ignore_eos=True))
    singles = [llm.generate([prompt], SamplingParams(temperature=1.0, seed=7 + i, max_tokens=5,
                                                     ignore_eos=True))[0] for i in range(3)]
    assert [o.token_ids for o in outs] == [o.token_ids for o in singles]
    assert outs[0].logprobs is None and outs[0].cumulative_logprob is None


@pytest.mark.parametrize("budget", [1, 5])
def test_prompt_logprobs_over_chunks_and_cached_prefixes(tmp_path, budget):
    """Prompt logprobs gathered chunk by chunk (budget 5: mixed steps; budget 1: decode-shaped
    steps walking the prompt) equal log_softmax(score()); a repeated prompt that asks for
    prompt logprobs recomputes every position instead of starting from the prefix cache."""
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    dirs = {"a": str(make_peft_adapter(hf, tmp_path / "a", seed=1, b_scale=0.5, r=4,
                                       lora_alpha=8))}
    llm = LLM(str(d), adapters=dirs, device="cpu", max_num_seqs=8, max_lora_rank=8,
              max_num_batched_tokens=budget)
    g = torch.Generator().manual_seed(11)
    prompt = [1] + torch.randint(4, 120, (37,), generator=g).tolist()  # crosses blocks
    names = [None, "a", "a"]
    plain = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True)
    llm.generate([prompt], plain, adapters=["a"])  # its blocks are now cached under "a"
    sp = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=3)
    outs = llm.generate([prompt] * 3, sp, adapters=names)
    scores = llm.score([prompt] * 3, adapters=names)
    for out, logits in zip(outs, scores, strict=True):
        ref = torch.log_softmax(logits, dim=-1)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for i in range(1, len(prompt)):
            _check_entry(out.prompt_logprobs[i], prompt[i], ref[i - 1], 3)
