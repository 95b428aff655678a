"""A demo-model server in this process whose engine attaches made-up logprobs, for tests of
the API's logprob shapes that must not depend on how the engine computes real ones."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import openai
from server_utils import InProcessServer

from loraplex import demo


@dataclass
class FakeLogprobs:  # the fields of engine.logprobs.TokenLogprobs
    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


def fake_entry(token_id: int, k: int) -> FakeLogprobs:
    """A made-up but distinct logprob per token id, and k alternatives (ids after it)."""
    logprob = -0.125 * (1 + token_id % 13)
    top = [(40 + (token_id + i) % 50, -0.5 - i) for i in range(k)]
    return FakeLogprobs(token_id, logprob, 1, top)


def attach_fake_logprobs(engine) -> None:
    step = engine.step

    def wrapped():
        params = {rid: seq.params for rid, seq in engine.requests.items()}
        outs = step()
        for out in outs:
            p = params.get(out.request_id)
            if p is None:
                continue
            if p.logprobs is not None:
                out.logprobs = [fake_entry(t, p.logprobs) for t in out.token_ids]
                out.cumulative_logprob = sum(e.logprob for e in out.logprobs)
            if p.prompt_logprobs is not None:
                ids = out.prompt_token_ids
                out.prompt_logprobs = [None] + [fake_entry(t, p.prompt_logprobs)
                                                for t in ids[1:]]
            out.num_cached_tokens = 3
        return outs

    engine.step = wrapped


@contextmanager
def demo_server() -> Iterator[InProcessServer]:
    """The demo model and adapters served as "demo", with ``attach_fake_logprobs``."""
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.server.api import ServerConfig, create_app

    model, adapters = demo.paths()
    engine = LLMEngine.from_args(model, adapters=adapters, device="cpu", num_kv_blocks=64)
    attach_fake_logprobs(engine)
    server = InProcessServer(create_app(engine, ServerConfig("demo", model, adapters)))
    try:
        yield server
    finally:
        server.stop()


def openai_client(srv: InProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0,
                         timeout=60)


def demo_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo.paths()[0])
