"""Robustness of the server against bad, huge, slow or hostile requests (issue 11).

Each test is a regression test for one defect: it failed on the server before the fix.
References: ``loraplex.LLM.generate`` in this process (bystanders must get exactly its
greedy outputs), the engine's own statistics on ``/metrics`` (resources freed), and a bare
keep-alive socket (``RawHTTP``) to tell an answered request from a dropped connection.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from helpers_lora import make_peft_adapter, make_tiny_model
from server_utils import InProcessServer, RawHTTP, ServerProcess, parse_metrics

from loraplex import LLM, SamplingParams

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["The cat sat on the mat", "In the beginning", "SELECT * FROM t;", "hello there"]
# A stream big enough to fill the socket buffers of a client that never reads it.
FLOOD = {"model": "ad0", "prompt": ["the the the"] * 8, "n": 8, "max_tokens": 250,
         "temperature": 0, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("robust")
    model_dir, hf = make_tiny_model(root / "tiny")
    runtime = root / "runtime"
    ad0 = make_peft_adapter(hf, runtime / "ad0", seed=11)
    huge = make_peft_adapter(hf, runtime / "huge", seed=12, b_scale=1e30)  # finite, NaN logits
    broken = runtime / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    return SimpleNamespace(root=root, model=str(model_dir), ad0=str(ad0), huge=str(huge),
                           runtime=runtime)


def _base_args(assets) -> list[str]:
    return ["--model", assets.model, "--adapter", f"ad0={assets.ad0}", "--api-key", KEY,
            "--max-num-seqs", "16", "--num-kv-blocks", "256"]


@pytest.fixture(scope="module")
def servers(assets):
    """main: default limits, runtime adapters; slow: a stream may lag 8 steps; stop: streams
    may lag for ever, and SIGTERM waits 2 s. Started together to overlap their start-ups."""
    procs = {
        "main": ServerProcess(_base_args(assets) + [
            "--adapter", f"huge={assets.huge}", "--allow-runtime-adapters", "--adapter-root",
            str(assets.runtime), "--max-sequences-per-request", "64"],
            assets.root / "main.log", wait=False),
        "slow": ServerProcess(_base_args(assets) + ["--max-stream-backlog", "8"],
                              assets.root / "slow.log", wait=False),
        "stop": ServerProcess(_base_args(assets) + ["--max-stream-backlog", "1000000",
                                                    "--shutdown-timeout", "2"],
                              assets.root / "stop.log", wait=False),
    }
    try:
        for proc in procs.values():
            proc.wait_healthy()
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def server(servers) -> ServerProcess:
    return servers["main"]


@pytest.fixture(scope="module")
def llm(assets) -> LLM:
    torch.set_num_threads(1)
    return LLM(assets.model, adapters={"ad0": assets.ad0}, device="cpu")


def greedy_text(llm: LLM, prompt: str, max_tokens: int, adapter: str | None = None) -> str:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return llm.generate([prompt], params, adapters=adapter)[0].text


def post(server, path: str, body, headers: dict | None = None, **kw) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(f"{server.base_url}{path}", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **AUTH, **(headers or {})},
                      **kw)


def metrics(base_url: str) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{base_url}/metrics", timeout=30).text)


def wait_released(base_url: str, timeout_s: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(base_url)
        if (m["loraplex_num_requests_running"] == 0 and m["loraplex_num_requests_waiting"] == 0
                and m["loraplex_kv_free_blocks"] == m["loraplex_kv_total_blocks"]
                and m["loraplex_lora_pinned_slots"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


# ------------------------------------------------------------------ 3. bounded inputs


def test_body_over_limit_is_413_before_it_is_read(server):
    """A declared Content-Length over --max-request-bytes (8 MiB) is answered at once, and
    without the API key nothing is read at all (401 first)."""
    for headers, status in ((AUTH, 413), ({}, 401)):
        conn = RawHTTP(server.base_url, timeout_s=20)
        try:
            head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            conn.sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: t\r\n{head}"
                              f"Content-Type: application/json\r\n"
                              f"Content-Length: {50 << 20}\r\n\r\n".encode())
            got, _, body = conn.read_response()  # no body sent: the old server waited for it
        finally:
            conn.close()
        assert got == status, body
        err = json.loads(body)["error"]
        assert (err["code"], err["type"]) == (("request_too_large", "RequestTooLargeError")
                                              if status == 413 else
                                              ("invalid_api_key", "AuthenticationError"))
    big = post(server, "/v1/completions", {"model": "tiny", "prompt": "a " * (5 << 20)})
    assert big.status_code == 413 and "--max-request-bytes" in big.json()["error"]["message"]


def test_body_limit_enforced_while_reading_a_chunked_body():
    """Without Content-Length the guard stops reading at the limit: it never buffers more."""
    from loraplex.server.middleware import RequestGuard

    reads, sent = [], []

    async def app(scope, receive, send):  # pragma: no cover - must not be reached
        raise AssertionError("the route ran")

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"x" * 65536, "more_body": True}  # endless

    async def send(message):
        sent.append(message)

    guard = RequestGuard(app, api_key=None, max_request_bytes=1 << 20)
    scope = {"type": "http", "method": "POST", "path": "/v1/completions",
             "headers": [(b"transfer-encoding", b"chunked")]}
    asyncio.run(guard(scope, receive, send))
    assert sent[0]["status"] == 413
    assert len(reads) == (1 << 20) // 65536 + 1  # stopped at the first chunk over 1 MiB


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_4mb_prompt_is_400_naming_the_limit_and_health_stays_live(server, route):
    """A 4 MB prompt is refused before tokenizing, and /health stays live meanwhile (the old
    server tokenized chat on the event loop: every route stalled for the whole request). The
    bound is relative to the big request's own time, so a loaded host cannot fail it: a blocked
    loop makes one /health call last about as long as the big request."""
    text = "hello there " * ((4 << 20) // 12)
    body = ({"model": "tiny", "prompt": text, "max_tokens": 2} if route == "completions" else
            {"model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 2})
    answer: list[httpx.Response] = []
    path = "/v1/completions" if route == "completions" else "/v1/chat/completions"
    big = threading.Thread(target=lambda: answer.append(post(server, path, body)))
    started = time.monotonic()
    big.start()
    slowest = 0.0
    while big.is_alive() or slowest == 0.0:  # liveness while the big request is in flight
        t = time.monotonic()
        assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
        slowest = max(slowest, time.monotonic() - t)
    big.join()
    took = time.monotonic() - started
    assert slowest < max(1.0, took / 2), (
        f"/health took {slowest:.2f} s while a 4 MB prompt was in flight ({took:.2f} s)")
    r = answer[0]
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "prompt_too_long" and "max_model_len=256" in err["message"]


def test_sequences_per_request_capped(server):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": ["hi"] * 9, "n": 8,
                                         "max_tokens": 1})
    assert r.status_code == 400
    assert "--max-sequences-per-request" in r.json()["error"]["message"]
    ok = post(server, "/v1/completions", {"model": "tiny", "prompt": ["hi"] * 8, "n": 8,
                                          "max_tokens": 1})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 64


# ------------------------------------------------------------------ 5. slow stream readers


def _open_unread_stream(base_url: str) -> socket.socket:
    host, port = base_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up quickly
    sock.connect((host, int(port)))
    body = json.dumps(FLOOD).encode()
    sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                 .encode() + body)
    return sock


def test_stream_never_read_is_aborted_and_frees_everything(servers):
    srv = servers["slow"]
    key = 'loraplex_requests_total{finish_reason="abort",model="ad0"}'
    before = metrics(srv.base_url).get(key, 0.0)
    sock = _open_unread_stream(srv.base_url)
    try:
        deadline = time.monotonic() + 60
        while metrics(srv.base_url).get(key, 0.0) == before and time.monotonic() < deadline:
            time.sleep(0.2)
        m = wait_released(srv.base_url)
        assert m.get(key, 0.0) > before, "the unread stream was not aborted"
        assert m["loraplex_kv_free_blocks"] == m["loraplex_kv_total_blocks"]
        assert m["loraplex_lora_pinned_slots"] == 0
        # the server closed the connection: draining what was buffered ends in EOF
        sock.settimeout(30)
        while sock.recv(1 << 16):
            pass
    finally:
        sock.close()
    r = post(srv, "/v1/completions", {"model": "ad0", "prompt": "hi", "max_tokens": 3})
    assert r.status_code == 200


def test_sigterm_with_a_stuck_stream_stops_within_the_deadline(servers):
    srv = servers["stop"]
    sock = _open_unread_stream(srv.base_url)
    try:
        deadline = time.monotonic() + 60
        while metrics(srv.base_url)["loraplex_num_requests_running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(3)  # the stream is blocked on the unread socket by now
        t = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        try:
            srv.proc.wait(30)  # --shutdown-timeout 2, then the stream is cancelled
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not stop within 30 s of SIGTERM with a stuck stream")
        assert time.monotonic() - t < 30
    finally:
        sock.close()


# ------------------------------------------------------------------ 7. undecodable input


POISON_BODIES = {
    "surrogate_prompt": b'{"model": "tiny", "prompt": "\\ud800", "max_tokens": 2}',
    "surrogate_chat": b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfff"}]}',
    "surrogate_stop": b'{"model": "tiny", "prompt": "x", "stop": ["\\ud800"]}',
    "surrogate_model": b'{"model": "\\ud800", "prompt": "x"}',
    "surrogate_key": b'{"model": "tiny", "prompt": "x", "\\ud800": 1}',
    "surrogate_extra": b'{"model": "tiny", "messages": [{"role": "user", "content": "x", '
                       b'"name": "\\ud800"}]}',
    "invalid_utf8": b'{"model": "tiny", "prompt": "\xff\xfe"}',
    "not_json": b"{not json",
}


def test_undecodable_input_is_400_on_a_live_keepalive_connection(server, llm):
    conn = RawHTTP(server.base_url)
    try:
        for name, body in POISON_BODIES.items():
            path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
            status, headers, resp = conn.request("POST", path, body, AUTH)
            assert status == 400, (name, resp)
            assert headers.get("connection") != "close", name
            assert "error" in json.loads(resp), name
        good = json.dumps({"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 5,
                           "temperature": 0}).encode()
        status, _, resp = conn.request("POST", "/v1/completions", good, AUTH)  # same socket
    finally:
        conn.close()
    assert status == 200
    assert json.loads(resp)["choices"][0]["text"] == greedy_text(llm, PROMPTS[0], 5)


# ------------------------------------------------------------------ 8. smaller ones


LOOSE = [
    ({"prompt": [1.0, 2.0]}, "prompt"), ({"prompt": [True, False]}, "prompt"),
    ({"max_tokens": True}, "max_tokens"), ({"n": "2"}, "n"), ({"temperature": "0.5"},
                                                               "temperature"),
    ({"stop": 5}, "stop"), ({"stream": "yes"}, "stream"), ({"ignore_eos": "no"}, "ignore_eos"),
    ({"seed": 1.5}, "seed"), ({"top_k": False}, "top_k"), ({"no_such_field": 1},
                                                             "no_such_field"),
    ({"logit_bias": {"1": "x"}}, "logit_bias"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"min_p": 2}, "min_p"),
]


@pytest.mark.parametrize("fields,param", LOOSE, ids=[p for _, p in LOOSE])
def test_loose_types_are_400_naming_the_field(server, fields, param):
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2,
                                         **fields})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert param in r.json()["error"]["message"]


def test_nan_temperature_is_400(server):
    r = post(server, "/v1/completions",
             b'{"model": "tiny", "prompt": "x", "temperature": NaN}')
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


def test_api_key_checked_before_the_body_is_decoded(server):
    for body in (b"{not json", b'{"model": 5}'):
        r = post(server, "/v1/completions", body, headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"


def test_docs_are_off_by_default(server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{server.base_url}{path}").status_code == 404


@pytest.mark.parametrize("name", ["a\nb", "x" * 129, "has space", "", "ü"])
def test_load_route_restricts_adapter_names(server, name):
    r = post(server, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "ad0"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"


def test_errors_name_only_what_the_client_sent(server, assets):
    unknown = post(server, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404
    message = unknown.json()["error"]["message"]
    assert "nope" in message and "ad0" not in message and "huge" not in message
    broken = post(server, "/v1/load_lora_adapter", {"lora_name": "b", "lora_path": "broken"})
    outside = post(server, "/v1/load_lora_adapter", {"lora_name": "o", "lora_path": "/etc"})
    assert (broken.status_code, outside.status_code) == (400, 403)
    for r in (broken, outside):
        assert str(assets.root) not in r.text and "/etc/" not in r.text
    assert "adapter_config.json" in broken.json()["error"]["message"]


def test_runtime_adapters_need_a_root(assets, caplog):
    """Refused at start without --adapter-root; --allow-any-adapter-path warns loudly."""
    from loraplex.server.api import ServerConfig, create_app

    t = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "loraplex.server", "--model", assets.model,
                           "--allow-runtime-adapters", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--adapter-root" in proc.stderr
    assert "Traceback" not in proc.stderr and time.monotonic() - t < 120
    with pytest.raises(ValueError, match="--adapter-root"):
        ServerConfig("tiny", assets.model, {}, allow_runtime_adapters=True)
    from transformers import AutoTokenizer

    from loraplex.lora.registry import AdapterRegistry

    engine = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(assets.model),
                             max_model_len=256, adapters=AdapterRegistry())
    with caplog.at_level("WARNING"):
        create_app(engine, ServerConfig("tiny", assets.model, {}, allow_runtime_adapters=True,
                                        allow_any_adapter_path=True))
    assert "ANY directory" in caplog.text


# ------------------------------------------------------------------ in-process fault injection


@pytest.fixture(scope="module")
def inproc(assets):
    """A real engine in this process (one running sequence at a time), its tokenizer slowed
    down 2 s for texts that contain SLOW, its steps slowed on demand (so a stream lasts),
    and its stats() failing on demand."""
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.server.api import ServerConfig, create_app

    engine = LLMEngine.from_args(assets.model, adapters={"ad0": assets.ad0}, device="cpu",
                                 num_kv_blocks=64, max_num_seqs=1)
    real_encode, real_stats, real_step = engine.tokenizer.encode, engine.stats, engine.step
    state = {"fail": False, "slow": False}

    def slow_encode(text, *args, **kw):
        if isinstance(text, str) and "SLOW" in text:
            time.sleep(2.0)  # stands in for tokenizing a long text
        return real_encode(text, *args, **kw)

    def stats():
        if state["fail"]:
            raise RuntimeError("injected bug")
        return real_stats()

    def step():
        if state["slow"]:
            time.sleep(0.05)
        return real_step()

    engine.tokenizer.encode, engine.stats, engine.step = slow_encode, stats, step
    config = ServerConfig("tiny", assets.model, {"ad0": assets.ad0},
                          allow_runtime_adapters=True, adapter_root=str(assets.runtime))
    srv = InProcessServer(create_app(engine, config))
    try:
        yield SimpleNamespace(srv=srv, engine=engine, state=state)
    finally:
        srv.stop()


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_tokenizing_blocks_neither_the_event_loop_nor_the_engine(inproc, llm, route):
    base = inproc.srv.base_url
    path = "/v1/completions" if route == "completions" else "/v1/chat/completions"
    body = ({"model": "tiny", "prompt": "SLOW x", "max_tokens": 2} if route == "completions"
            else {"model": "tiny", "messages": [{"role": "user", "content": "SLOW"}],
                  "max_tokens": 2})
    done: list[float] = []
    slow = threading.Thread(target=lambda: (post(inproc.srv, path, body),
                                            done.append(time.monotonic())))
    slow.start()
    time.sleep(0.3)  # the slow request is being tokenized now
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    assert not done, "health waited for the tokenizer"
    small = post(inproc.srv, "/v1/completions", {"model": "tiny", "prompt": PROMPTS[1],
                                                 "max_tokens": 4, "temperature": 0})
    assert not done, "a small request waited for another request's tokenization"
    assert small.json()["choices"][0]["text"] == greedy_text(llm, PROMPTS[1], 4)
    slow.join()


def test_unhandled_error_is_500_and_keeps_the_connection(inproc):
    conn = RawHTTP(inproc.srv.base_url)
    try:
        inproc.state["fail"] = True
        status, headers, body = conn.request("GET", "/metrics")
        assert status == 500 and json.loads(body)["error"]["code"] == "internal_error"
        assert headers.get("connection") != "close"
        inproc.state["fail"] = False
        assert conn.request("GET", "/metrics")[0] == 200  # same socket
    finally:
        inproc.state["fail"] = False
        conn.close()


def test_request_queued_for_an_unloaded_adapter_gets_404(inproc, assets):
    """One running slot: a request for ad0 waits behind a long base-model stream; ad0 is
    unloaded meanwhile. It gets a 404 naming ad0 (it got 500 engine_step_failed)."""
    base, srv = inproc.srv.base_url, inproc.srv
    inproc.state["slow"] = True
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{base}/v1/completions",
                         json={"model": "tiny", "prompt": "hi", "max_tokens": 200,
                               "ignore_eos": True, "stream": True}) as long:
            lines = long.iter_lines()  # kept: closing it would close the connection
            assert next(line for line in lines if line.startswith("data: "))
            queued: list[httpx.Response] = []
            waiter = threading.Thread(target=lambda: queued.append(post(
                srv, "/v1/completions", {"model": "ad0", "prompt": "x", "max_tokens": 2})))
            waiter.start()
            deadline = time.monotonic() + 30
            while inproc.engine.stats()["num_waiting"] == 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert post(srv, "/v1/unload_lora_adapter", {"lora_name": "ad0"}).status_code == 200
        waiter.join(60)  # the long stream was left: it is aborted, the queued one admitted
    inproc.state["slow"] = False
    r = queued[0]
    assert r.status_code == 404, r.text
    assert "'ad0'" in r.json()["error"]["message"]
    assert post(srv, "/v1/load_lora_adapter", {"lora_name": "ad0", "lora_path": "ad0"}
                ).status_code == 200


# ------------------------------------------------------------------ 9, 10. engine set-up


def test_cpu_bfloat16_without_avx512_falls_back_to_dense_weights(assets):
    """ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN behave as on an AVX2-only CPU, where prepacking
    bfloat16 weights raised. The engine falls back to dense weights and generates the same
    greedy tokens as an engine built with prepacking off."""
    code = f"""
import logging, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
from loraplex.engine.llm_engine import LLMEngine
from loraplex.layers.linear import LinearBase
from loraplex.sampling_params import SamplingParams
def run(**kw):
    e = LLMEngine.from_args({assets.model!r}, device="cpu", dtype="bfloat16", **kw)
    e.add_request("r", "The cat sat on the mat", SamplingParams(max_tokens=12, temperature=0))
    out = []
    while e.has_unfinished_requests():
        out += e.step()
    packed = sum(m.packed is not None for m in e.runner.model.modules()
                 if isinstance(m, LinearBase))
    return out[-1].token_ids, packed
auto, packed = run()
dense, _ = run(cpu_prepack=False)
print("RESULT", auto == dense, packed, len(auto))
"""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RESULT True 0 12" in proc.stdout
    assert "using dense weights" in proc.stdout


def test_cuda_device_without_cuda_is_a_clear_error(assets):
    from loraplex.config import resolve_device
    from loraplex.errors import DeviceError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="torch reports no CUDA device") as e:
        resolve_device("cuda")
    assert torch.__version__ in str(e.value)
    proc = subprocess.run([sys.executable, "-m", "loraplex.server", "--model", assets.model,
                           "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no CUDA device" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ chaos


def _chaos_poisons(assets) -> dict[str, object]:
    return {
        "temperature_1e-300": {"model": "tiny", "prompt": "x", "temperature": 1e-300,
                               "max_tokens": 8},
        "top_p_1e-300": {"model": "tiny", "prompt": "x", "temperature": 1.0, "top_p": 1e-300,
                         "max_tokens": 8},
        "prompt_4mb": {"model": "tiny", "prompt": "hello " * ((4 << 20) // 6), "max_tokens": 2},
        "surrogate": POISON_BODIES["surrogate_prompt"],
        "body_over_limit": {"model": "tiny", "prompt": "a " * (5 << 20)},
        "never_read_stream": "NEVER_READ",
        "loose_types": {"model": "tiny", "prompt": [True, 1.0], "max_tokens": True},
        "adapter_b_1e30": {"model": "huge", "prompt": "x", "max_tokens": 8},
    }


@pytest.mark.parametrize("poison", [
    "temperature_1e-300", "top_p_1e-300", "prompt_4mb", "surrogate", "body_over_limit",
    "never_read_stream", "loose_types", "adapter_b_1e30",
])
def test_chaos_bystanders_finish_exactly(server, llm, assets, poison):
    """8 concurrent greedy streams (base and ad0) while one poisoned request is sent: every
    bystander gets exactly the output it gets alone."""
    bystanders = [dict(model="ad0" if i % 2 else "tiny", prompt=PROMPTS[i % 4],
                       max_tokens=24 + i, temperature=0) for i in range(8)]
    expected = [greedy_text(llm, b["prompt"], b["max_tokens"],
                            "ad0" if b["model"] == "ad0" else None) for b in bystanders]
    body = _chaos_poisons(assets)[poison]

    unread: list[socket.socket] = []

    def send_poison() -> None:
        if body == "NEVER_READ":
            unread.append(_open_unread_stream(server.base_url))  # closed after the bystanders
            return
        try:
            post(server, "/v1/completions", body)
        except httpx.TransportError:  # the poison's own fate is not the point here
            pass

    async def stream(aclient: openai.AsyncOpenAI, req: dict) -> str:
        text = ""
        async for chunk in await aclient.completions.create(stream=True, **req):
            text += "".join(c.text for c in chunk.choices)
        return text

    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key=KEY,
                                     max_retries=0, timeout=120)
        async with aclient:
            tasks = [asyncio.ensure_future(stream(aclient, b)) for b in bystanders]
            await asyncio.sleep(0.05)
            await asyncio.to_thread(send_poison)
            return await asyncio.gather(*tasks)

    try:
        assert asyncio.run(run()) == expected
    finally:
        for sock in unread:
            sock.close()
    m = wait_released(server.base_url)
    assert m["loraplex_kv_free_blocks"] == m["loraplex_kv_total_blocks"]
