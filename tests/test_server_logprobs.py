"""OpenAI logprob shapes, echo, ``best_of`` and cached-token usage, parsed by the official
``openai`` client, streaming and not.

Shapes are checked over an in-process demo server whose engine attaches made-up logprobs
(``server_fakes.fake_entry``): every number in a response must be the one the test made up,
under the token string ``tokenizer.decode([id])`` computes here. The last test runs once the
engine computes real logprobs (``loraplex.engine.logprobs``) and compares them with
``log_softmax`` of ``LLM.score()``'s logits.
"""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch
from server_fakes import demo_server, demo_tokenizer, fake_entry, openai_client

from loraplex import demo

PHRASE = "hello world"
PROMPT = demo.prompt(PHRASE)


@pytest.fixture(scope="module")
def client():
    with demo_server() as server:
        yield openai_client(server)


@pytest.fixture(scope="module")
def tok():
    return demo_tokenizer()


def expected_completion_logprobs(tok, pairs, offset=0) -> dict:
    """The completions logprobs object, written out from OpenAI's / vLLM's definition."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token_id, k in pairs:  # k None: no logprobs for this token (a prompt's first)
        s = tok.decode([token_id])
        out["tokens"].append(s)
        out["text_offset"].append(offset)
        offset += len(s)
        if k is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        e = fake_entry(token_id, k)
        out["token_logprobs"].append(e.logprob)
        top = {}
        for t, lp in e.top:
            top.setdefault(tok.decode([t]), lp)
        top.setdefault(s, e.logprob)
        out["top_logprobs"].append(top)
    return out


def as_dict(logprobs) -> dict:
    return {k: getattr(logprobs, k) for k in ("tokens", "token_logprobs", "top_logprobs",
                                              "text_offset")}


def test_completion_logprobs(client, tok):
    r = client.completions.create(model="upper", prompt=PROMPT, max_tokens=32, temperature=0,
                                  logprobs=2)
    c = r.choices[0]
    assert c.text == PHRASE.upper()
    ids = tok.encode(c.text) + [tok.eos_token_id]  # the EOS token is generated, not shown
    assert as_dict(c.logprobs) == expected_completion_logprobs(tok, [(t, 2) for t in ids])
    assert r.usage.prompt_tokens_details.cached_tokens == 3


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_echo_with_logprobs_prepends_the_prompt(client, tok, max_tokens):
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=max_tokens,
                                  temperature=0, echo=True, logprobs=1)
    c = r.choices[0]
    prompt_ids = tok.encode(PROMPT)
    generated = tok.encode(PHRASE[:max_tokens])
    assert c.text == PROMPT + PHRASE[:max_tokens]
    pairs = [(prompt_ids[0], None)] + [(t, 1) for t in prompt_ids[1:]] + \
        [(t, 1) for t in generated]
    assert as_dict(c.logprobs) == expected_completion_logprobs(tok, pairs)
    assert r.usage.prompt_tokens == len(prompt_ids)
    assert r.usage.completion_tokens == max_tokens
    if max_tokens == 0:  # scoring only: nothing generated is shown or counted
        assert c.finish_reason == "length"


def test_echo_without_logprobs_and_token_prompts(client, tok):
    ids = tok.encode(PROMPT)
    for prompt in ([PROMPT, PROMPT], [ids, ids]):  # echo of token ids: their decoded text
        r = client.completions.create(model="demo", prompt=prompt, max_tokens=32,
                                      temperature=0, echo=True)
        assert [c.text for c in r.choices] == [PROMPT + PHRASE] * 2
        assert all(c.logprobs is None for c in r.choices)


def test_chat_logprobs(client, tok):
    r = client.chat.completions.create(model="reverse", temperature=0, logprobs=True,
                                       top_logprobs=3,
                                       messages=[{"role": "user", "content": PHRASE}])
    c = r.choices[0]
    assert c.message.content == PHRASE[::-1]
    ids = tok.encode(PHRASE[::-1]) + [tok.eos_token_id]
    assert len(c.logprobs.content) == len(ids)
    for item, t in zip(c.logprobs.content, ids, strict=True):
        e = fake_entry(t, 3)
        assert item.token == tok.decode([t]) and item.logprob == e.logprob
        assert item.bytes == list(tok.decode([t]).encode())
        assert [(a.token, a.logprob, a.bytes) for a in item.top_logprobs] == [
            (tok.decode([a]), lp, list(tok.decode([a]).encode())) for a, lp in e.top]
    plain = client.chat.completions.create(model="reverse", temperature=0,
                                           messages=[{"role": "user", "content": PHRASE}])
    assert plain.choices[0].logprobs is None


def test_streamed_logprobs_equal_the_full_response(client):
    kw = dict(model="caesar", prompt=PROMPT, max_tokens=32, temperature=0, logprobs=2,
              echo=True)
    full = client.completions.create(**kw).choices[0]
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text, reasons = "", []
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            reasons.append(c.finish_reason)
            if c.logprobs is not None:
                for key in merged:
                    merged[key] += getattr(c.logprobs, key)
    assert text == full.text and reasons[-1] == "stop"
    assert merged == as_dict(full.logprobs)

    chat = dict(model="caesar", temperature=0, logprobs=True, top_logprobs=2,
                messages=[{"role": "user", "content": PHRASE}])
    full_chat = client.chat.completions.create(**chat).choices[0]
    items = []
    for chunk in client.chat.completions.create(stream=True, **chat):
        for c in chunk.choices:
            if c.logprobs is not None:
                items += c.logprobs.content
    assert [i.model_dump() for i in items] == \
        [i.model_dump() for i in full_chat.logprobs.content]


def test_best_of_returns_the_n_most_likely_candidates(client):
    # a prompt unlike the training data: the samples differ
    kw = dict(model="demo", prompt="zq", max_tokens=6, temperature=1.0, seed=11)
    # best_of = n: the candidates themselves (candidate j is seeded seed + j), with logprobs
    cands = client.completions.create(n=4, logprobs=0, **kw).choices
    scores = [sum(c.logprobs.token_logprobs) for c in cands]
    order = sorted(range(4), key=lambda j: -scores[j])[:2]
    assert order != [0, 1] and len(set(scores)) > 2  # ranking matters for this seed
    best = client.completions.create(n=2, best_of=4, **kw)
    assert [c.text for c in best.choices] == [cands[j].text for j in order]
    assert [c.index for c in best.choices] == [0, 1]
    assert all(c.logprobs is None for c in best.choices)  # used for ranking, not asked for
    assert best.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in cands)


def test_streamed_usage_reports_cached_tokens(client):
    chunks = list(client.chat.completions.create(
        model="demo", stream=True, stream_options={"include_usage": True}, temperature=0,
        messages=[{"role": "user", "content": PHRASE}]))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 3


# ------------------------------------------------------------------ real engine logprobs


def test_real_logprobs_equal_log_softmax_of_score(tmp_path):
    pytest.importorskip("loraplex.engine.logprobs", reason="engine logprobs not merged yet")
    from server_utils import InProcessServer

    from loraplex import LLM
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.server.api import ServerConfig, create_app

    model, adapters = demo.paths()
    ref = LLM(model, adapters=adapters, device="cpu")
    engine = LLMEngine.from_args(model, adapters=adapters, device="cpu", num_kv_blocks=64)
    server = InProcessServer(create_app(engine, ServerConfig("demo", model, adapters)))
    try:
        c = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0)

        async def one(adapter):  # all adapters in flight at once: one mixed batch
            return await c.completions.create(model=adapter or "demo", prompt=PROMPT,
                                              max_tokens=8, temperature=0, logprobs=1,
                                              echo=True)

        async def run():
            chat = c.chat.completions.create(model="upper", temperature=0, logprobs=True,
                                             top_logprobs=2, messages=[
                                                 {"role": "user", "content": PHRASE}])
            return await asyncio.gather(chat, *(one(a) for a in [None, *demo.ADAPTERS]))

        chat, *results = asyncio.run(run())
    finally:
        server.stop()
    tok = ref.engine.tokenizer
    out_ids = tok.encode(PHRASE.upper()) + [tok.eos_token_id]
    prompt_ids = tok.encode(PROMPT)
    lp = torch.log_softmax(ref.score([prompt_ids + out_ids], adapters=["upper"])[0].double(),
                           -1)[len(prompt_ids) - 1:-1]
    content = chat.choices[0].logprobs.content
    assert [i.token for i in content] == [tok.decode([t]) for t in out_ids]
    for row, item, t in zip(lp, content, out_ids, strict=True):
        assert abs(item.logprob - row[t].item()) < 1e-5
        top = row.topk(2)
        assert [a.token for a in item.top_logprobs] == [tok.decode([i]) for i in top.indices]
        assert all(abs(a.logprob - v.item()) < 1e-5 for a, v in zip(
            item.top_logprobs, top.values, strict=True))
    for adapter, r in zip([None, *demo.ADAPTERS], results, strict=True):
        lp = r.choices[0].logprobs
        ids = ref.engine.tokenizer.encode(r.choices[0].text)
        logits = ref.score([ids], adapters=[adapter])[0]
        want = torch.log_softmax(logits[:-1].double(), -1).gather(
            1, torch.tensor(ids[1:])[:, None])[:, 0]
        got = torch.tensor(lp.token_logprobs[1:], dtype=torch.float64)
        assert lp.token_logprobs[0] is None
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_minus_infinity_is_written_as_vllm_does(tok):
    """JSON has no infinity: -inf logprobs (a token masked out) become -9999.0, and two ids
    that decode to the same string keep the more likely one's logprob."""
    import json

    from server_fakes import FakeLogprobs

    from loraplex.server.openai_logprobs import TokenStrings, chat_logprobs, completion_logprobs

    strings = TokenStrings(tok)
    a, b = tok.encode("ab")
    entry = FakeLogprobs(a, float("-inf"), 90, [(b, -0.1), (b, -3.0)])
    comp, end = completion_logprobs([(a, entry), (b, None)], strings, text_offset=5)
    assert comp == {"tokens": ["a", "b"], "token_logprobs": [-9999.0, None],
                    "top_logprobs": [{"b": -0.1, "a": -9999.0}, None], "text_offset": [5, 6]}
    assert end == 7
    chat = chat_logprobs([(a, entry)], strings)
    assert chat["content"][0]["logprob"] == -9999.0
    json.dumps(chat, allow_nan=False)  # strict JSON


def test_sampling_fields_reach_the_engine():
    """Each newly honoured field changes the output exactly as the same SamplingParams do
    through ``LLM.generate`` (greedy), and differs from the output without it."""
    pytest.importorskip("loraplex.engine.penalties", reason="engine penalties not merged yet")
    from loraplex import LLM, SamplingParams

    model, adapters = demo.paths()
    llm = LLM(model, adapters=adapters, device="cpu")
    x = llm.engine.tokenizer.encode("x")[0]
    unsure = "zq zq zq"  # unlike the training data: the model is unsure, so penalties bite
    cases = [(unsure, {"presence_penalty": 2.0}), (unsure, {"frequency_penalty": 2.0}),
             (unsure, {"repetition_penalty": 3.0}), (PROMPT, {"min_tokens": 20}),
             (PROMPT, {"logit_bias": {str(x): 100.0}}),
             (PROMPT, {"stop": ["wor"], "include_stop_str_in_output": True})]
    with demo_server() as server:
        c = openai_client(server)
        for prompt, fields in cases:
            got = c.completions.create(model="demo", prompt=prompt, max_tokens=24,
                                       temperature=0, extra_body=fields).choices[0].text
            kw = dict(fields)
            if "logit_bias" in kw:
                kw["logit_bias"] = {int(k): v for k, v in kw["logit_bias"].items()}
            want = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0,
                                                         **kw))[0].text
            neutral = llm.generate([prompt], SamplingParams(max_tokens=24, temperature=0))
            assert got == want, fields
            assert got != neutral[0].text, fields


def test_echo_waits_for_prompt_logprobs_and_comes_first():
    """Made-up deltas, as an engine might send them: generated text before the prompt's
    logprobs are ready stays held back, so the echoed prompt still comes first."""
    from server_fakes import FakeLogprobs

    from loraplex.server.async_engine import OutputDelta
    from loraplex.server.responses import ChoiceOutput, best_of, usage

    def lp(t: int) -> FakeLogprobs:
        return FakeLogprobs(t, -1.0, 1, [])

    out = ChoiceOutput([7, 8], echo="ab", wants_prompt_logprobs=True)
    first = out.add(OutputDelta("c", [9], 2, False, None, logprobs=[lp(9)],
                                cumulative_logprob=-1.0))
    assert (first.text, first.tokens) == ("", [])
    second = out.add(OutputDelta("d", [10], 2, True, "length", logprobs=[lp(10)],
                                 prompt_logprobs=[None, lp(8)], cumulative_logprob=-2.0,
                                 num_cached_tokens=1))
    assert second.text == "abcd" and second.finish_reason == "length"
    assert [t for t, _ in second.tokens] == [7, 8, 9, 10]
    assert second.tokens[0][1] is None and second.tokens[1][1].token_id == 8
    assert out.text == "abcd" and out.num_tokens == 2 and out.cumulative_logprob == -2.0
    # scoring only (max_tokens 0): the generated token is neither shown nor counted
    score = ChoiceOutput([7, 8], echo="ab", wants_prompt_logprobs=True, score_only=True)
    piece = score.add(OutputDelta("c", [9], 2, True, "stop", prompt_logprobs=[None, lp(8)]))
    assert (piece.text, piece.finish_reason, score.num_tokens) == ("ab", "length", 0)
    assert usage([out, score], 1) == {"prompt_tokens": 4, "completion_tokens": 2,
                                      "total_tokens": 6,
                                      "prompt_tokens_details": {"cached_tokens": 1}}
    assert best_of([score, out], 2, 1) == [out]  # no logprobs ranks last
