"""Fuzzing the two generation endpoints with random request bodies (hypothesis).

Every field gets random JSON of any type (wrong types, huge and negative numbers, odd
unicode including lone surrogates, nested junk), fields go missing, unknown fields appear,
streaming and not. Property: the server answers every request with 200 or a 4xx in the
OpenAI error shape, or a stream of well-formed events that ends with ``[DONE]`` (an error
event allowed), on the same keep-alive connection: never a 5xx, a dropped connection or a
hang. A normal greedy request after each example, and others sent all along from another
thread, get exactly ``LLM.generate``'s output.
"""

from __future__ import annotations

import json
import threading

import httpx
import pytest
import torch
from helpers_lora import make_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_utils import RawHTTP, ServerProcess

from loraplex import LLM, SamplingParams

KEY = "fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NORMAL = {"model": "tiny", "prompt": "The cat sat on the mat", "max_tokens": 6,
          "temperature": 0}
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    model_dir, _ = make_tiny_model(root / "tiny")
    # A short context keeps every example cheap: no request generates more than ~60 tokens.
    proc = ServerProcess(["--model", str(model_dir), "--api-key", KEY, "--max-model-len", "64",
                          "--max-num-seqs", "8", "--num-kv-blocks", "64",
                          "--max-sequences-per-request", "4"], root / "fuzz.log")
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # beside the server process; restored for later files
    try:
        llm = LLM(str(model_dir), device="cpu", max_model_len=64)
        expected = llm.generate([NORMAL["prompt"]], SamplingParams(max_tokens=6, temperature=0))
        yield proc, expected[0].text
    finally:
        torch.set_num_threads(before)
        proc.stop()


@pytest.fixture(scope="module")
def conn(fuzz_server):
    c = RawHTTP(fuzz_server[0].base_url, timeout_s=60)  # a hang fails the test here
    yield c
    c.close()


@pytest.fixture(scope="module")
def bystander(fuzz_server):
    """Normal requests sent all along from another thread; their mismatches are kept."""
    srv, text = fuzz_server
    stop, problems = threading.Event(), []

    def run() -> None:
        with httpx.Client(timeout=60, headers=AUTH) as http:
            while not stop.is_set():
                r = http.post(f"{srv.base_url}/v1/completions", json=NORMAL)
                if r.status_code != 200 or r.json()["choices"][0]["text"] != text:
                    problems.append(r.text)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield problems
    stop.set()
    thread.join(60)


odd_text = st.sampled_from(["", "\ud800", "a\udfffb", "\x00", "\uffff", "😀" * 3, "\u202e",
                            "é" * 50, "<|user|>", "\n\r\t", "tiny", "hello there"])
text = st.one_of(odd_text, st.text(max_size=20))
numbers = st.one_of(st.integers(), st.integers(-3, 70), st.floats(allow_nan=False),
                    st.floats(0, 2), st.sampled_from([0, 1, -1, 2**63, 2**64, -2**63, 1e-300,
                                                      1e308, 0.5]))
json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), numbers, text),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(text, inner, max_size=3)),
    max_leaves=8)
ids = st.lists(st.integers(0, 127), min_size=1, max_size=8)


def often(common: st.SearchStrategy, rare: st.SearchStrategy) -> st.SearchStrategy:
    """``common`` about nine times in ten, else ``rare`` (``one_of`` would pick either half
    the time)."""
    return st.sampled_from([True] * 9 + [False]).flatmap(lambda c: common if c else rare)


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a plausible value, else any JSON value."""
    return often(valid, json_value)


COMMON = {
    "max_tokens": field(st.integers(1, 20)), "temperature": field(st.floats(0, 2)),
    "top_p": field(st.floats(0.01, 1)), "top_k": field(st.integers(-1, 50)),
    "min_p": field(st.sampled_from([None, 0])), "seed": field(st.integers(0, 2**62)),
    "stop": field(st.one_of(text, st.lists(text, max_size=3))),
    "stop_token_ids": field(st.lists(st.integers(0, 127), max_size=3)),
    "ignore_eos": field(st.booleans()), "n": field(st.integers(1, 2)),
    "stream_options": field(st.builds(lambda b: {"include_usage": b}, st.booleans())),
    "presence_penalty": field(st.sampled_from([None, 0, 0.5])),
    "logit_bias": field(st.sampled_from([None, {}, {"5": 1.5}])), "user": field(text),
}
COMPLETION_REQUIRED = {
    "model": field(st.just("tiny")), "stream": field(st.booleans()),
    "prompt": field(st.one_of(text, st.lists(text, min_size=1, max_size=2), ids,
                              st.lists(ids, min_size=1, max_size=2)))}
COMPLETION = {**COMMON, "echo": field(st.booleans()),
              "logprobs": field(st.one_of(st.none(), st.integers(0, 3)))}
part = st.builds(lambda t: {"type": "text", "text": t}, text)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]),
     "content": st.one_of(text, st.lists(part, max_size=2))})
CHAT_REQUIRED = {"model": field(st.just("tiny")), "stream": field(st.booleans()),
                 "messages": field(st.lists(message, min_size=1, max_size=3))}
CHAT = {**COMMON, "max_completion_tokens": field(st.integers(1, 20)),
        "logprobs": field(st.booleans()), "top_logprobs": field(st.integers(0, 3)),
        "add_generation_prompt": field(st.booleans())}


def bodies(required: dict, optional: dict) -> st.SearchStrategy[bytes]:
    """The required fields (each sometimes missing), a random subset of the optional ones,
    sometimes unknown fields, as JSON; now and then raw junk bytes instead."""
    present = often(st.fixed_dictionaries(required), st.fixed_dictionaries({}, optional=required))
    fields = st.builds(_join, present, st.fixed_dictionaries({}, optional=optional),
                       often(st.just(True), st.just(False)))
    extra = often(st.just({}), st.dictionaries(text, json_value, min_size=1, max_size=2))
    as_json = st.builds(lambda d, e: json.dumps({**e, **d}).encode(), fields, extra)
    return often(as_json, st.binary(max_size=40))


def _join(required: dict, optional: dict, consistent: bool) -> dict:
    """Mostly keep ``stream_options`` to streams (it is refused otherwise), so that streams
    get past validation often."""
    body = {**required, **optional}
    if consistent and body.get("stream") is not True:
        body.pop("stream_options", None)
    return body


def check_answer(conn: RawHTTP, path: str, body: bytes) -> None:
    status, headers, resp = conn.request("POST", path, body, AUTH)
    assert status == 200 or 400 <= status < 500, (status, body, resp)
    assert headers.get("connection") != "close", (status, body, resp)
    if status != 200:
        err = json.loads(resp)["error"]
        assert {"message", "type", "code"} <= set(err), resp
        return
    if headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in resp.decode().split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", resp
        for event in events[:-1]:
            json.loads(event)  # every event is one JSON object (a chunk or an error)
    else:
        assert json.loads(resp)["choices"], resp


def check_normal(conn: RawHTTP, expected: str) -> None:
    status, _, resp = conn.request("POST", "/v1/completions", json.dumps(NORMAL).encode(), AUTH)
    assert status == 200 and json.loads(resp)["choices"][0]["text"] == expected, resp


@FUZZ
@given(body=bodies(COMPLETION_REQUIRED, COMPLETION))
def test_fuzz_completions(fuzz_server, conn, bystander, body):
    check_answer(conn, "/v1/completions", body)
    check_normal(conn, fuzz_server[1])
    assert not bystander, bystander[:3]


@FUZZ
@given(body=bodies(CHAT_REQUIRED, CHAT))
def test_fuzz_chat_completions(fuzz_server, conn, bystander, body):
    check_answer(conn, "/v1/chat/completions", body)
    check_normal(conn, fuzz_server[1])
    assert not bystander, bystander[:3]
