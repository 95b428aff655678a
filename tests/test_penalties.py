"""Penalties and constraints: greedy generation after each one equals a direct reference
written here (fp32 logits from ``LLM.score()``, the penalty applied in plain Python, argmax),
for rows of a mixed batch with different adapters and settings, next to rows with none."""

from __future__ import annotations

import pytest
import torch
from helpers_lora import EOS, make_peft_adapter, make_tiny_model

from loraplex import LLM, SamplingParams
from loraplex.engine.model_runner import ModelRunner
from loraplex.engine.penalties import Penalties
from loraplex.engine.sampler import Sampler
from loraplex.engine.sequence import Sequence


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("penalties")
    d, hf = make_tiny_model(root / "base", "llama")
    a = make_peft_adapter(hf, root / "a", seed=1, r=4, lora_alpha=8, b_scale=0.5)
    return LLM(str(d), adapters={"a": str(a)}, device="cpu", max_num_seqs=16, max_lora_rank=8)


def _reference_process(logits: torch.Tensor, prompt: list[int], out: list[int],
                       p: SamplingParams, bad_words: list[list[int]]) -> torch.Tensor:
    """The definitions, token by token (no batching, no device tables)."""
    x = logits.clone().tolist()
    for word in bad_words:
        if len(word) == 1 or (len(out) >= len(word) - 1 and out[len(out) - len(word) + 1:]
                              == word[:-1]):
            x[word[-1]] = float("-inf")
    if len(out) < p.min_tokens:
        for t in [EOS, *p.stop_token_ids]:
            x[t] = float("-inf")
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    for t in set(prompt) | set(out):
        if p.repetition_penalty != 1:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(out):
        x[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    return torch.tensor(x)


def _reference_greedy(llm, prompt, p, adapter, bad_words=()):
    out: list[int] = []
    while len(out) < p.max_tokens:
        logits = llm.score([prompt + out], adapters=[adapter])[0][-1]
        tok = int(_reference_process(logits, prompt, out, p, list(bad_words)).argmax())
        out.append(tok)
        if tok == EOS and not p.ignore_eos:
            break
    return out


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(11)
    return [[1] + torch.randint(4, 40, (int(k),), generator=g).tolist()  # repeats likely
            for k in torch.randint(6, 24, (n,), generator=g)]


CASES = {
    "presence": dict(presence_penalty=1.5),
    "frequency": dict(frequency_penalty=0.7),
    "negative frequency": dict(frequency_penalty=-0.5),
    "repetition": dict(repetition_penalty=1.8),
    "repetition below 1": dict(repetition_penalty=0.6),
    "all three": dict(presence_penalty=0.4, frequency_penalty=0.3, repetition_penalty=1.3),
    "logit_bias": dict(logit_bias={5: 3.0, 17: 2.5, 60: -100.0}),
    "none": dict(),
}


def test_each_penalty_equals_reference_in_a_mixed_batch(llm):
    names = list(CASES)
    prompts = _prompts(len(names))
    adapters = [[None, "a"][i % 2] for i in range(len(names))]
    params = [SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, **CASES[n])
              for n in names]
    outs = llm.generate(prompts, params, adapters=adapters)
    plain = outs[names.index("none")].token_ids
    for name, prompt, p, a, out in zip(names, prompts, params, adapters, outs):
        assert out.token_ids == _reference_greedy(llm, prompt, p, a), name
    # the penalties really change what the model says (else the test shows nothing)
    unpenalised = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0,
                                                       ignore_eos=True), adapters=adapters)
    changed = [n for n, o, u in zip(names, outs, unpenalised) if o.token_ids != u.token_ids]
    assert set(changed) >= set(names) - {"none", "repetition below 1"}, changed
    assert unpenalised[names.index("none")].token_ids == plain


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached(llm):
    prompt = _prompts(1)[0]
    # a bias makes EOS (and token 9) the favourite, so only min_tokens keeps them away
    bias = {EOS: 30.0, 9: 29.0}
    p = SamplingParams(max_tokens=12, temperature=0, min_tokens=5, logit_bias=bias,
                       stop_token_ids=[9])
    (out,) = llm.generate([prompt], p, adapters="a")
    assert out.token_ids == _reference_greedy(llm, prompt, p, "a")
    assert len(out.token_ids) == 6 and out.token_ids[-1] in (EOS, 9)
    assert EOS not in out.token_ids[:5] and 9 not in out.token_ids[:5]
    assert out.finish_reason == "stop"


def test_bad_words_are_banned_where_they_would_complete(llm):
    tok = llm.tokenizer
    prompt = _prompts(2)[1]
    plain = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0,
                                                  ignore_eos=True))[0]
    word = tok.decode(plain.token_ids[2:4])  # a word the model would say
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, bad_words=[word])
    ids = [tok.encode(w, add_special_tokens=False) for w in (word.lstrip(), " " + word.lstrip())]
    (out,) = llm.generate([prompt], p)
    assert out.token_ids == _reference_greedy(llm, prompt, p, None, ids)
    assert out.token_ids != plain.token_ids


def test_include_stop_str_in_output(llm):
    prompt = _prompts(3)[2]
    base = dict(max_tokens=12, temperature=0, ignore_eos=True)
    text = llm.generate([prompt], SamplingParams(**base))[0].text
    stop = text[3:5]
    cut = text.find(stop)
    kept = llm.generate([prompt], SamplingParams(stop=[stop], include_stop_str_in_output=True,
                                                 **base))[0]
    dropped = llm.generate([prompt], SamplingParams(stop=[stop], **base))[0]
    assert kept.text == text[: cut + len(stop)] and kept.finish_reason == "stop"
    assert dropped.text == text[:cut]


def test_logit_bias_ids_are_checked_against_the_vocabulary(llm):
    from loraplex.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="logit_bias token id 128"):
        llm.generate([[1, 5, 6]], SamplingParams(logit_bias={128: 1.0}))


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", float("nan")), ("repetition_penalty", 0),
    ("min_tokens", -1), ("min_tokens", 99), ("logit_bias", {-1: 1.0}),
    ("logit_bias", {3: 200.0}), ("bad_words", [""]), ("logprobs", 21), ("logprobs", -1),
    ("prompt_logprobs", 1.5), ("n", 0), ("best_of", 1), ("include_stop_str_in_output", 1),
])
def test_invalid_fields_are_refused_by_name(field, value):
    kw = {field: value}
    if field == "best_of":
        kw["n"] = 2
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**kw)


def test_no_penalties_leave_the_logits_untouched_and_counts_are_incremental():
    pen = Penalties(eos_ids=[EOS], capacity=1)
    logits = torch.randn(3, 50)
    seqs = [Sequence(i, str(i), [1, 4, 4, 7], SamplingParams()) for i in range(3)]
    assert pen(logits.clone(), seqs).equal(logits) and pen.counts is None
    seqs += [Sequence(3, "3", [1, 4], SamplingParams(frequency_penalty=1.0)),
             Sequence(4, "4", [1, 4], SamplingParams(repetition_penalty=2.0))]
    pen(torch.randn(5, 50), seqs)  # two counted rows: the table grows past capacity 1
    for toks in ([0, 0, 0, 8, 9], [0, 0, 0, 8, 9], [0, 0, 0, 6, 9]):
        pen.record(seqs, toks)
        for s, t in zip(seqs, toks):
            s.output_token_ids.append(t)
    rows = {sid: r for sid, (_, r) in pen._slot.items()}
    assert pen.counts[rows[3], 8] == 2 and pen.counts[rows[3], 6] == 1
    assert pen.counts[rows[4], 9] == 3 and pen.prompt_seen[rows[4], 4]
    x = torch.randn(5, 50)
    got = pen(x.clone(), seqs)
    assert torch.allclose(got[3], _reference_process(x[3], [1, 4], seqs[3].output_token_ids,
                                                     seqs[3].params, []))
    assert torch.allclose(got[4], _reference_process(x[4], [1, 4], seqs[4].output_token_ids,
                                                     seqs[4].params, []))
    assert got[:3].equal(x[:3])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sampled_rows_see_the_penalised_logits(device):
    """Both samplers (the tensor-op CPU path and, on CUDA, the fused kernel) draw from the
    logits after the penalty stage, as ModelRunner._sample runs it."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    runner = ModelRunner.__new__(ModelRunner)  # the sampling stage only: no model
    runner.penalties = Penalties(eos_ids=[EOS])
    runner.sampler = Sampler(0)
    runner.guided = None  # no structured-output rows
    logits = torch.randn(4, 300, device=device)
    params = [SamplingParams(temperature=1.0, logit_bias={7: 100.0}),  # only 7 can win
              SamplingParams(temperature=0.9, top_k=5, logit_bias={11: 100.0}),
              SamplingParams(temperature=1.0, min_tokens=3, logit_bias={EOS: 100.0}),
              SamplingParams(temperature=1.0, logprobs=2)]
    seqs = [Sequence(i, str(i), [1, 5], p, seed=i) for i, p in enumerate(params)]
    raw = torch.log_softmax(logits, dim=-1)  # before the penalty stage changes the logits
    out = runner._sample(logits.clone(), seqs, list(range(4)))
    assert out.token_ids[:2] == [7, 11]
    assert out.token_ids[2] != EOS  # masked by min_tokens despite the bias
    assert out.logprobs[:3] == [None, None, None]
    lp = out.logprobs[3]
    assert abs(lp.logprob - raw[3, out.token_ids[3]].item()) <= 1e-5
    assert [t for t, _ in lp.top] == raw[3].topk(2).indices.tolist()
