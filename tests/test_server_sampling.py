"""Server side of per-request sampling failures and of ``min_p``: a request whose adapter
makes NaN/inf logits gets an OpenAI-style error (500 body, or an error event then [DONE]
when streaming) while a concurrent normal request completes with the right tokens."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from helpers_lora import make_peft_adapter, make_tiny_model
from server_utils import InProcessServer

PROMPT = "The cat sat on the mat"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.server.api import ServerConfig, create_app

    root = tmp_path_factory.mktemp("srv_sampling")
    model, hf = make_tiny_model(root / "tiny")
    adapters = {"bad": str(make_peft_adapter(hf, root / "bad", seed=2, r=4, b_scale=1e30)),
                "good": str(make_peft_adapter(hf, root / "good", seed=1, r=4))}
    engine = LLMEngine.from_args(str(model), adapters=adapters, device="cpu", num_kv_blocks=64,
                                 max_lora_rank=8)
    server = InProcessServer(create_app(engine, ServerConfig("tiny", str(model), adapters)))
    try:
        yield server, engine
    finally:
        server.stop()


def _body(model: str, **kw) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, **kw}


async def _post(client: httpx.AsyncClient, body: dict) -> httpx.Response:
    return await client.post("/v1/completions", json=body)


def test_poisoned_request_errors_alone(srv):
    server, engine = srv

    async def run():
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as c:
            alone = (await _post(c, _body("good"))).json()["choices"][0]["text"]
            normal, bad, bad_stream = await asyncio.gather(
                _post(c, _body("good")), _post(c, _body("bad", temperature=0.8, seed=1)),
                _post(c, _body("bad", stream=True)))
            return alone, normal, bad, bad_stream

    alone, normal, bad, bad_stream = asyncio.run(run())
    assert normal.status_code == 200
    assert normal.json()["choices"][0]["text"] == alone
    assert bad.status_code == 500
    err = bad.json()["error"]
    assert "non-finite logits" in err["message"] and "'bad'" in err["message"]
    assert err["type"] == "InternalServerError"
    events = [line[len("data: "):] for line in bad_stream.text.splitlines() if line]
    assert bad_stream.status_code == 200 and events[-1] == "[DONE]"
    assert "non-finite logits" in json.loads(events[-2])["error"]["message"]
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert engine.stats()["num_pinned_slots"] == 0


def test_chat_and_min_p_pass_through(srv):
    server, _ = srv
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        greedy = c.post("/v1/completions", json=_body("good")).json()["choices"][0]["text"]
        # min_p = 1 keeps only the most likely token: sampling at any temperature is greedy
        top = c.post("/v1/completions", json=_body("good", temperature=1.5, min_p=1.0, seed=4))
        assert top.status_code == 200 and top.json()["choices"][0]["text"] == greedy
        chat = c.post("/v1/chat/completions", json={
            "model": "good", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "min_p": 0.5, "seed": 3})
        assert chat.status_code == 200
        for field, value in (("min_p", 1.5), ("temperature", 1e-300), ("top_p", 1e-300)):
            r = c.post("/v1/completions", json=_body("good", **{field: value}))
            assert r.status_code == 400 and field in r.json()["error"]["message"]
