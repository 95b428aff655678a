"""The OpenAI-compatible server, end to end: a real server process, the official client.

References: ``loraplex.LLM.generate`` in this process on the same model and adapters (greedy
and seeded outputs must match exactly), the same request sent alone (for concurrency), and the
engine's own statistics on ``/metrics`` (for resources freed after a disconnect).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from helpers_lora import make_peft_adapter, make_tiny_model
from server_utils import InProcessServer, ServerProcess, parse_metrics

from loraplex import LLM, SamplingParams

KEY = "test-key"
NUM_ADAPTERS = 16
PROMPTS = ["The cat sat on the mat", "In the beginning", "SELECT * FROM t;", "hello there"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("server")
    model_dir, hf = make_tiny_model(root / "tiny")
    adapters = {f"ad{i}": str(make_peft_adapter(hf, root / f"ad{i}", seed=100 + i))
                for i in range(NUM_ADAPTERS)}
    runtime_root = root / "runtime"
    rt = make_peft_adapter(hf, runtime_root / "rt", seed=7)
    outside = make_peft_adapter(hf, root / "outside", seed=8)
    (runtime_root / "escape").symlink_to(outside, target_is_directory=True)
    broken = runtime_root / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    # a second model whose tokenizer has no chat template
    plain_dir, _ = make_tiny_model(root / "plain", seed=3)
    _drop_chat_template(plain_dir)
    return SimpleNamespace(root=root, model=str(model_dir), adapters=adapters,
                           runtime_root=runtime_root, rt=str(rt), outside=str(outside),
                           plain=str(plain_dir))


def _drop_chat_template(model_dir: Path) -> None:
    (model_dir / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def servers(assets):
    """Both server processes, started together so their start-ups overlap."""
    args = ["--model", assets.model, "--max-loras-per-batch", "4", "--max-num-seqs", "16",
            "--num-kv-blocks", "256", "--api-key", KEY, "--allow-runtime-adapters",
            "--adapter-root", str(assets.runtime_root)]
    for name, path in assets.adapters.items():
        args += ["--adapter", f"{name}={path}"]
    # the plain one: no adapters, no API key, no runtime loading, no chat template, custom name
    plain_args = ["--model", assets.plain, "--served-model-name", "plain-model",
                  "--num-kv-blocks", "64"]
    procs = [ServerProcess(args, assets.root / "server.log", wait=False),
             ServerProcess(plain_args, assets.root / "plain_server.log", wait=False)]
    try:
        for proc in procs:
            proc.wait_healthy()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="module")
def server(servers) -> ServerProcess:
    return servers[0]


@pytest.fixture(scope="module")
def plain_server(servers) -> ServerProcess:
    return servers[1]


@pytest.fixture(scope="module")
def llm(assets) -> Iterator[LLM]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the server processes run beside it; restored for later files
    yield LLM(assets.model, adapters=assets.adapters, max_loras_per_batch=4, device="cpu")
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0,
                         timeout=120)


def metrics(base_url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{base_url}/metrics", timeout=30).text)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


# ------------------------------------------------------------------ models, completions


def test_health_and_models(server, client, assets):
    assert httpx.get(f"{server.base_url}/health").json() == {"status": "ok"}
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", *assets.adapters}
    assert getattr(models["tiny"], "parent", None) is None
    for name, path in assets.adapters.items():
        assert models[name].parent == "tiny"
        assert models[name].root == os.path.realpath(path)


@pytest.mark.parametrize("adapter", [None, "ad3"])
def test_completions_match_llm(client, llm, adapter):
    model = adapter or "tiny"
    ref = llm.generate(PROMPTS, greedy(12), adapters=adapter)
    got = client.completions.create(model=model, prompt=PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in got.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in got.choices] == [r.text for r in ref]
    assert [c.finish_reason for c in got.choices] == [r.finish_reason for r in ref]
    assert got.usage.prompt_tokens == sum(len(r.prompt_token_ids) for r in ref)
    assert got.usage.completion_tokens == sum(len(r.token_ids) for r in ref)
    # streaming: deltas concatenate to the same texts; a usage chunk comes last
    texts, reasons, usage = [""] * len(PROMPTS), [None] * len(PROMPTS), None
    for chunk in client.completions.create(model=model, prompt=PROMPTS, max_tokens=12,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [r.text for r in ref]
    assert reasons == [r.finish_reason for r in ref]
    assert usage.completion_tokens == got.usage.completion_tokens


def test_completion_n_seed_stop_and_token_prompt(client, llm):
    # n choices per prompt are distinct sub-requests; choice j samples with seed + j
    params = [SamplingParams(max_tokens=10, temperature=0.9, seed=5 + j, stop=["e "])
              for j in range(3)]
    ref = llm.generate([PROMPTS[0]] * 3 + [PROMPTS[1]] * 3, params * 2, adapters="ad1")
    got = client.completions.create(model="ad1", prompt=PROMPTS[:2], n=3, max_tokens=10,
                                    temperature=0.9, seed=5, stop="e ")
    assert [c.text for c in got.choices] == [r.text for r in ref]
    assert [c.finish_reason for c in got.choices] == [r.finish_reason for r in ref]
    assert len({r.text for r in ref[:3]}) > 1  # the seeds differ, so do the samples
    # a prompt given as token ids
    ids = llm.tokenizer.encode(PROMPTS[2])
    by_ids = client.completions.create(model="ad1", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == llm.generate([ids], greedy(8), adapters="ad1")[0].text


@pytest.mark.parametrize("adapter", [None, "ad5"])
def test_chat_matches_llm(client, llm, adapter):
    model = adapter or "tiny"
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "what is the answer"}]
    text = llm.tokenizer.apply_chat_template(messages, tokenize=False,
                                             add_generation_prompt=True)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    ref = llm.generate([ids], greedy(10), adapters=adapter)[0]
    got = client.chat.completions.create(model=model, messages=messages, max_tokens=10,
                                         temperature=0)
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == ref.text
    assert got.choices[0].finish_reason == ref.finish_reason
    assert got.usage.prompt_tokens == len(ids)
    chunks = list(client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == ref.text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] == ref.finish_reason and not any(finals[:-1])
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)


# ------------------------------------------------------------------ concurrency


def test_64_concurrent_streams_over_16_adapters(server, client):
    """With 4 adapter slots and 16 running seqs, 64 streams (completions and chat) must all
    finish and each equal the same request sent alone (greedy, or seeded sampling)."""
    before = metrics(server.base_url)
    reqs = []
    for i in range(64):
        sampled = i % 2 == 1
        req = dict(model=f"ad{i % NUM_ADAPTERS}", max_tokens=8 + i % 5,
                   temperature=0.8 if sampled else 0.0, seed=i if sampled else None)
        if i % 4 < 2:
            req["prompt"] = PROMPTS[i % len(PROMPTS)]
        else:
            req["messages"] = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        reqs.append(req)

    async def stream_one(aclient: openai.AsyncOpenAI, req: dict) -> tuple[str, str]:
        text, reason = "", None
        api = aclient.chat.completions if "messages" in req else aclient.completions
        async for chunk in await api.create(stream=True, **req):
            for c in chunk.choices:
                text += (c.delta.content or "") if "messages" in req else c.text
                reason = c.finish_reason or reason
        return text, reason

    async def run_all() -> list[tuple[str, str]]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=KEY,
                                     max_retries=0, timeout=300,
                                     http_client=openai.DefaultAsyncHttpxClient(
                                         limits=httpx.Limits(max_connections=100)))
        async with aclient:
            return await asyncio.gather(*(stream_one(aclient, r) for r in reqs))

    together = asyncio.run(run_all())
    alone = []
    for req in reqs:
        if "messages" in req:
            c = client.chat.completions.create(**req).choices[0]
            alone.append((c.message.content, c.finish_reason))
        else:
            c = client.completions.create(**req).choices[0]
            alone.append((c.text, c.finish_reason))
    assert together == alone
    after = metrics(server.base_url)
    # 16 adapters through 4 slots: adapters were loaded and evicted on the way
    assert after["loraplex_adapter_evictions_total"] > before["loraplex_adapter_evictions_total"]
    assert after["loraplex_lora_pinned_slots"] == 0
    assert after["loraplex_num_requests_running"] == 0


# ------------------------------------------------------------------ runtime adapters


def _post(server, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.base_url}{path}", json=body, headers=headers, timeout=60)


def test_runtime_adapter_lifecycle(server, client, llm, assets):
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": "rt"})
    assert r.status_code == 200, r.text
    assert "rt" in {m.id for m in client.models.list().data}
    llm.load_adapter("rt", assets.rt)
    ref = llm.generate([PROMPTS[0]], greedy(9), adapters="rt")[0]
    got = client.completions.create(model="rt", prompt=PROMPTS[0], max_tokens=9, temperature=0)
    assert got.choices[0].text == ref.text
    m = metrics(server.base_url)  # per-adapter accounting: this was rt's only request
    assert m['loraplex_generation_tokens_total{model="rt"}'] == len(ref.token_ids)
    assert m['loraplex_prompt_tokens_total{model="rt"}'] == len(ref.prompt_token_ids)
    assert m[f'loraplex_requests_total{{finish_reason="{ref.finish_reason}",model="rt"}}'] == 1
    # the same name twice is refused
    again = _post(server, "/v1/load_lora_adapter", {"lora_name": "rt", "lora_path": "rt"})
    assert again.status_code == 400
    assert _post(server, "/v1/unload_lora_adapter", {"lora_name": "rt"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="rt", prompt="x", max_tokens=2)
    assert "rt" not in {m.id for m in client.models.list().data}
    gone = _post(server, "/v1/unload_lora_adapter", {"lora_name": "rt"})
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "NotFoundError"


@pytest.mark.parametrize("path", ["../outside", "OUTSIDE_ABS", "escape", "escape/../../outside"])
def test_runtime_load_outside_root_refused(server, assets, path):
    path = assets.outside if path == "OUTSIDE_ABS" else path
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "evil", "lora_path": path})
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["code"] == "adapter_path_forbidden" and "outside the adapter root" in err["message"]


def test_runtime_load_broken_adapter_is_400_and_server_lives(server, client, llm):
    r = _post(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "broken"})
    assert r.status_code == 400, r.text
    assert "adapter_config.json" in r.json()["error"]["message"]
    missing = _post(server, "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "nope"})
    assert missing.status_code == 400
    got = client.completions.create(model="ad2", prompt=PROMPTS[1], max_tokens=5, temperature=0)
    assert got.choices[0].text == llm.generate([PROMPTS[1]], greedy(5), adapters="ad2")[0].text


def test_runtime_adapters_disabled_without_flag(plain_server, assets):
    r = _post(plain_server, "/v1/load_lora_adapter",
              {"lora_name": "rt", "lora_path": assets.rt}, key=None)
    assert r.status_code == 403
    assert "--allow-runtime-adapters" in r.json()["error"]["message"]
    r = _post(plain_server, "/v1/unload_lora_adapter", {"lora_name": "rt"}, key=None)
    assert r.status_code == 403


# ------------------------------------------------------------------ disconnects


def _running_resources_released(base_url: str, timeout_s: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(base_url)
        if (m["loraplex_num_requests_running"] == 0 and m["loraplex_num_requests_waiting"] == 0
                and m["loraplex_kv_free_blocks"] == m["loraplex_kv_total_blocks"]
                and m["loraplex_lora_pinned_slots"] == 0) or time.monotonic() > deadline:
            return m


def test_disconnect_mid_stream_aborts_and_frees(server):
    key = 'loraplex_requests_total{finish_reason="abort",model="ad9"}'
    aborted = metrics(server.base_url).get(key, 0.0)
    body = {"model": "ad9", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.base_url}/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            events = 0
            for line in r.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break  # leave mid-stream: the connection closes with the block
    m = _running_resources_released(server.base_url)
    assert m["loraplex_num_requests_running"] == 0
    assert m["loraplex_kv_free_blocks"] == m["loraplex_kv_total_blocks"]
    assert m["loraplex_lora_pinned_slots"] == 0
    assert m[key] == aborted + 1
    # a non-streaming request whose client gives up is aborted too: the client closes its
    # socket once the request runs (not after a fixed wait, which a fast host outruns)
    body.update(stream=False, max_tokens=240)
    payload = json.dumps(body).encode()
    host, port = server.base_url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nAuthorization: Bearer " + KEY.encode() + b"\r\nContent-Length: "
                 + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    deadline = time.monotonic() + 30
    while metrics(server.base_url)["loraplex_num_requests_running"] == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.005)
    sock.close()
    m = _running_resources_released(server.base_url)
    assert m["loraplex_kv_free_blocks"] == m["loraplex_kv_total_blocks"]
    assert m["loraplex_lora_pinned_slots"] == 0
    assert m[key] == aborted + 2


# ------------------------------------------------------------------ auth and errors


def test_api_key_required_on_v1(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{server.base_url}/v1/models", headers=headers)
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "AuthenticationError"
    bad = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=2)
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/metrics").status_code == 200


def test_errors_are_openai_shaped(server, client, llm):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    bad_params = [dict(temperature=-1), dict(top_p=0), dict(n=0), dict(max_tokens=0),
                  dict(logprobs=21), dict(extra_body={"top_k": -5})]
    for kw in bad_params:
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="x", **{"max_tokens": 2, **kw})
    with pytest.raises(openai.BadRequestError) as e:  # too long for max_model_len=256
        client.completions.create(model="tiny", prompt="word " * 300, max_tokens=2)
    assert "tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[5, 10_000], max_tokens=2)
    with pytest.raises(openai.BadRequestError):  # streaming requests are validated up front
        client.completions.create(model="ad1", prompt="word " * 300, max_tokens=2, stream=True)
    raw = httpx.post(f"{server.base_url}/v1/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}",
                              "Content-Type": "application/json"})
    assert raw.status_code == 400 and set(raw.json()["error"]) >= {"message", "type", "code"}
    missing = _post(server, "/v1/completions", {"model": "tiny"})
    assert missing.status_code == 400 and "prompt" in missing.json()["error"]["message"]
    # still serving, same answers
    got = client.completions.create(model="tiny", prompt=PROMPTS[3], max_tokens=4, temperature=0)
    assert got.choices[0].text == llm.generate([PROMPTS[3]], greedy(4))[0].text


def test_plain_server_name_and_missing_chat_template(plain_server):
    c = openai.OpenAI(base_url=f"{plain_server.base_url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in c.models.list().data] == ["plain-model"]
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="plain-model",
                                  messages=[{"role": "user", "content": "hi"}])
    assert "chat template" in e.value.body["message"]
    assert c.completions.create(model="plain-model", prompt="hi", max_tokens=3).choices


# ------------------------------------------------------------------ engine failures


def test_engine_step_failure_fails_requests_and_keeps_serving(assets, llm):
    """A step that raises fails the requests in flight (500 / error event), then the server
    keeps serving: fault injected into a real engine running in this process."""
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.server.api import ServerConfig, create_app

    engine = LLMEngine.from_args(assets.model, adapters={"ad0": assets.adapters["ad0"]},
                                 device="cpu", num_kv_blocks=64)
    real_step, failures = engine.step, [2]

    def flaky_step():
        if failures[0] > 0:
            failures[0] -= 1
            raise RuntimeError("injected step failure")
        return real_step()

    engine.step = flaky_step
    app = create_app(engine, ServerConfig("tiny", assets.model, {"ad0": assets.adapters["ad0"]}))
    srv = InProcessServer(app)
    try:
        c = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.InternalServerError) as e:
            c.completions.create(model="ad0", prompt=PROMPTS[0], max_tokens=4)
        assert "injected step failure" in e.value.body["message"]
        with pytest.raises(openai.APIError, match="injected step failure"):
            for _ in c.completions.create(model="ad0", prompt=PROMPTS[0], max_tokens=4,
                                          stream=True):
                pass
        assert engine.stats()["num_free_blocks"] == engine.stats()["num_total_blocks"]
        got = c.completions.create(model="ad0", prompt=PROMPTS[0], max_tokens=6, temperature=0)
        assert got.choices[0].text == llm.generate([PROMPTS[0]], greedy(6), adapters="ad0")[0].text
        assert httpx.get(f"{srv.base_url}/health").status_code == 200
    finally:
        srv.stop()


def test_short_request_not_blocked_by_long_one(server, client):
    """A short request started while a long stream runs finishes while the long one is
    still generating (continuous batching, one stream per request)."""
    body = {"model": "ad4", "prompt": PROMPTS[1], "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.base_url}/v1/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
            short = client.completions.create(model="ad6", prompt="hi", max_tokens=2,
                                              temperature=0)
            assert short.choices[0].finish_reason in ("length", "stop")
            assert metrics(server.base_url)["loraplex_num_requests_running"] == 1  # long one
    _running_resources_released(server.base_url)


def test_usage_reports_prefix_cache_hits_and_metrics_count_them(server, client):
    prompt = list(range(10, 60))  # 50 token ids: 3 full blocks before the last token
    first = client.completions.create(model="ad3", prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model="ad3", prompt=prompt, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens == 48
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert again.choices[0].text == first.choices[0].text
    m = metrics(server.base_url)
    assert m["loraplex_prefix_cache_hits_total"] >= 48
    assert m["loraplex_prefix_cache_queries_total"] >= m["loraplex_prefix_cache_hits_total"]
    # per-adapter gauges: declared even while idle (no adapter has requests now)
    text = httpx.get(f"{server.base_url}/metrics", timeout=30).text
    assert "# TYPE loraplex_adapter_requests_running gauge" in text
    assert "# TYPE loraplex_adapter_requests_waiting gauge" in text


def test_metrics_export_per_adapter_request_counts():
    from loraplex.server.metrics import ServerMetrics

    text = ServerMetrics().render({"adapter_requests": {"a": {"waiting": 1, "running": 2},
                                                        "": {"waiting": 0, "running": 3}},
                                   "prefix_cache_hits": 48}).decode()
    assert 'loraplex_adapter_requests_waiting{adapter="a"} 1.0' in text
    assert 'loraplex_adapter_requests_running{adapter="a"} 2.0' in text
    assert 'loraplex_adapter_requests_running{adapter=""} 3.0' in text
    assert "loraplex_prefix_cache_hits_total 48.0" in text
