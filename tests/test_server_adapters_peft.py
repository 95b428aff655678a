"""DoRA and embedding-LoRA adapters through the HTTP server: concurrent completions on DoRA,
embedding-LoRA and plain LoRA adapters and on the base model (one engine, so they share
batches) each give PEFT's greedy tokens (transformers + ``PeftModel.from_pretrained`` loaded
fresh from the adapter's directory), streamed or not."""

from __future__ import annotations

import asyncio

import openai
import pytest
import torch
from helpers_lora import load_hf_model, make_peft_adapter, make_tiny_model, peft_reference
from server_utils import CLIENT_TIMEOUT, InProcessServer
from test_dora import perturb_magnitudes

STEPS = 10
ADAPTERS = {  # name -> make_peft_adapter kwargs
    "dora": dict(r=8, lora_alpha=16, use_dora=True),
    "dora_qv": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj"]),
    "emb": dict(r=8, lora_alpha=16, target_modules=["embed_tokens"]),
    "emb_mlp": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "gate_proj", "down_proj"]),
    "plain": dict(r=8, lora_alpha=16),
    "plain_qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
}
PROMPTS = [[1, 40, 71, 72, 85, 66, 90], [1, 52, 101, 33, 47, 47, 80, 69, 99, 14, 20]]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.server.api import ServerConfig, create_app

    root = tmp_path_factory.mktemp("server_peft")
    d, hf = make_tiny_model(root / "base", "llama")
    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        dirs[name] = str(make_peft_adapter(hf, root / name, seed=i, b_scale=0.5, **kw))
        if kw.get("use_dora"):  # as trained: the magnitudes differ from ||W + s*B@A||
            perturb_magnitudes(dirs[name], seed=20 + i)
    engine = LLMEngine.from_args(str(d), adapters=dirs, device="cpu", num_kv_blocks=256,
                                 max_lora_rank=8, max_loras_per_batch=len(dirs))
    server = InProcessServer(create_app(engine, ServerConfig("tiny", str(d), dirs)))
    try:
        yield server, str(d), dirs, engine.tokenizer
    finally:
        server.stop()


def _peft_tokens(model_dir: str, dirs: dict[str, str]) -> dict[tuple[str, int], list[int]]:
    """(model name, prompt index) -> PEFT's (or transformers', for the base) greedy tokens."""
    base = load_hf_model(model_dir)
    out = {}
    for name in ["tiny", *dirs]:
        model = base if name == "tiny" else peft_reference(base, dirs[name])
        for i, ids in enumerate(PROMPTS):
            with torch.no_grad():
                gen = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=STEPS,
                                     min_new_tokens=STEPS, do_sample=False, eos_token_id=None)
            out[(name, i)] = gen[0, len(ids):].tolist()
    return out


@pytest.mark.parametrize("stream", [False, True])
def test_dora_and_embedding_adapters_through_the_server_equal_peft(served, stream):
    server, model_dir, dirs, tokenizer = served
    client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0,
                                timeout=CLIENT_TIMEOUT)

    async def complete(model: str, prompt: list[int]) -> tuple[str, list[str], int]:
        kw = dict(model=model, prompt=prompt, max_tokens=STEPS, temperature=0, logprobs=0,
                  extra_body={"ignore_eos": True})
        if not stream:
            r = await client.completions.create(**kw)
            c = r.choices[0]
            return c.text, c.logprobs.tokens, r.usage.completion_tokens
        text, tokens = "", []
        async for chunk in await client.completions.create(stream=True, **kw):
            for c in chunk.choices:
                text += c.text
                tokens += c.logprobs.tokens if c.logprobs else []
        return text, tokens, len(tokens)

    async def run_all():
        jobs = [(name, i) for name in ["tiny", *dirs] for i in range(len(PROMPTS))]
        results = await asyncio.gather(*(complete(n, PROMPTS[i]) for n, i in jobs))
        await client.close()
        return dict(zip(jobs, results, strict=True))

    got = asyncio.run(run_all())
    want = _peft_tokens(model_dir, dirs)
    for key, ref in want.items():
        text, tokens, count = got[key]
        assert count == STEPS, key
        # one string per token: the token sequence itself, not only its text
        assert tokens == [tokenizer.decode([t]) for t in ref], key
        assert text == tokenizer.decode(ref, skip_special_tokens=True), key
    # the adapters do change the tokens (else this would not test them)
    for name in dirs:
        assert any(want[(name, i)] != want[("tiny", i)] for i in range(len(PROMPTS))), name
