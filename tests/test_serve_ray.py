"""Replicas on Ray Serve: a local Ray cluster, 2 CPU replicas of a tiny model, 8 adapters.

References: ``LLM.generate`` in this process (greedy), the ``loraplex serve`` error bodies,
and the official ``openai`` client for streaming. Routing is read from the
``x-loraplex-replica`` header the ingress puts on every response.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

import httpx  # noqa: E402
from helpers_lora import make_peft_adapter, make_tiny_model  # noqa: E402
from server_utils import free_port  # noqa: E402

from loraplex.llm import LLM  # noqa: E402
from loraplex.sampling_params import SamplingParams  # noqa: E402

ADAPTERS = [f"a{i}" for i in range(8)]
BASE = "tiny"
PROMPTS = ["the cat", "in the", "a tree", "there are"]
MAX_TOKENS = 8
LONG_TOKENS = 96  # long enough that the kill lands while requests run


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from loraplex.serve_ray.app import RayServeConfig, build_app

    root = tmp_path_factory.mktemp("serve_ray")
    model_dir, hf = make_tiny_model(root / BASE)
    adapters = {name: str(make_peft_adapter(hf, root / name, seed=10 + i, r=4, lora_alpha=8))
                for i, name in enumerate(ADAPTERS)}
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "PYTHONPATH": _pythonpath()}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = RayServeConfig(
            model=str(model_dir), adapters=adapters, replicas=2, num_cpus_per_replica=0.5,
            max_loras_per_replica=8, engine_args=dict(device="cpu", num_kv_blocks=64,
                                                      max_num_seqs=16))
        serve.run(build_app(config), name="loraplex", route_prefix="/")
        # one replica holding at most 2 adapters, under a route prefix: LRU eviction
        small = dataclasses.replace(config, replicas=1, max_loras_per_replica=2)
        serve.run(build_app(small), name="small", route_prefix="/small")
        yield {"url": f"http://127.0.0.1:{port}", "model_dir": str(model_dir),
               "adapters": adapters}
    finally:
        serve.shutdown()
        ray.shutdown()


def _pythonpath() -> str:
    import os

    import loraplex

    return os.path.dirname(os.path.dirname(loraplex.__file__))


@pytest.fixture(scope="module")
def expected(cluster):
    """Greedy texts from LLM.generate for every (model, prompt)."""
    llm = LLM(cluster["model_dir"], adapters=cluster["adapters"], device="cpu",
              num_kv_blocks=64)
    models = [BASE, *ADAPTERS]
    pairs = [(m, p) for m in models for p in PROMPTS]
    outs = llm.generate([p for _, p in pairs], SamplingParams(max_tokens=MAX_TOKENS,
                                                              temperature=0, ignore_eos=True),
                        adapters=[None if m == BASE else m for m, _ in pairs])
    return {pair: out.text for pair, out in zip(pairs, outs)}


def complete(url: str, model: str, prompt: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", timeout=300, json={
        "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
        "ignore_eos": True, **extra})


def test_requests_for_an_adapter_stick_to_the_replica_that_loaded_it(cluster, expected):
    # first in the module: later tests send concurrent first requests, which may load an
    # adapter on both replicas
    homes: dict[str, str] = {}
    for name in ADAPTERS:  # the first request of each adapter decides where it lives
        r = complete(cluster["url"], name, PROMPTS[0])
        assert r.status_code == 200
        homes.setdefault(name, r.headers["x-loraplex-replica"])
    time.sleep(1.5)  # Ray pushes each replica's model ids to the routers periodically
    jobs = [(name, p) for _ in range(2) for name in ADAPTERS for p in PROMPTS]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda mp: complete(cluster["url"], *mp), jobs))
    hits: Counter[str] = Counter()
    total: Counter[str] = Counter()
    for (name, prompt), r in zip(jobs, responses):
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[(name, prompt)]
        total[name] += 1
        hits[name] += r.headers["x-loraplex-replica"] == homes[name]
    for name in ADAPTERS:
        assert hits[name] >= 0.8 * total[name], (name, hits, total, homes)
    assert len(set(homes.values())) == 2, homes  # both replicas took adapters


def test_unknown_model_gets_the_serve_404_body(cluster):
    r = complete(cluster["url"], "nope", "hi")
    assert r.status_code == 404
    assert r.json() == {"error": {"message": "The model 'nope' does not exist.",
                                  "type": "NotFoundError", "code": "model_not_found",
                                  "param": None}}
    r = httpx.post(f"{cluster['url']}/v1/completions", content=b"{not json", timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "BadRequestError"


def test_adapters_beyond_max_loras_per_replica_are_evicted_lru(cluster, expected):
    url = f"{cluster['url']}/small"
    loads = []
    for name in ["a0", "a1", "a2", "a0", "a2"]:  # a2 evicts a0, a0 evicts a1, a2 stays
        r = complete(url, name, PROMPTS[0])
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[(name,
                                                                                  PROMPTS[0])]
        loads.append(int(r.headers["x-loraplex-replica-adapter-loads"]))
    assert loads == [1, 2, 3, 4, 4]
    listed = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]}
    assert listed == {BASE, "a0", "a2"}  # a1 was unregistered from the engine
    # 4 adapters through 2 resident places, concurrently: evictions while others run
    jobs = [(name, p) for name in ADAPTERS[:4] for p in PROMPTS] * 2
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda mp: complete(url, *mp), jobs))
    for pair, r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected[pair], pair
    deadline = time.monotonic() + 30  # the last eviction's unregistering may still run
    while True:
        listed = {m["id"] for m in httpx.get(f"{url}/v1/models", timeout=60).json()["data"]}
        if len(listed - {BASE}) <= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(listed - {BASE}) <= 2, listed


def test_outputs_equal_llm_generate(cluster, expected):
    pairs = list(expected)
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda mp: complete(cluster["url"], *mp), pairs))
    for pair, r in zip(pairs, responses):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected[pair], pair
        assert r.json()["model"] == pair[0]


def test_streaming_through_the_ingress_with_the_openai_client(cluster, expected):
    from openai import OpenAI

    client = OpenAI(base_url=f"{cluster['url']}/v1", api_key="unused", max_retries=0)
    for model in (BASE, ADAPTERS[3]):
        stream = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=MAX_TOKENS,
                                           temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        chunks = [c.choices[0].text for c in stream if c.choices]
        assert len(chunks) > 1  # token by token, not one buffered body
        assert "".join(chunks) == expected[(model, PROMPTS[1])]


@pytest.fixture(scope="module")
def expected_long(cluster):
    llm = LLM(cluster["model_dir"], adapters=cluster["adapters"], device="cpu",
              num_kv_blocks=64)
    outs = llm.generate([PROMPTS[0]] * len(ADAPTERS),
                        SamplingParams(max_tokens=LONG_TOKENS, temperature=0, ignore_eos=True),
                        adapters=ADAPTERS)
    return {name: out.text for name, out in zip(ADAPTERS, outs)}


def _replicas_running() -> int:
    status = serve.status().applications["loraplex"].deployments["LoraplexReplica"]
    return status.replica_states.get("RUNNING", 0)


def test_killing_a_replica_loses_no_request_that_had_not_streamed(cluster, expected_long):
    url = cluster["url"]
    before = {complete(url, BASE, PROMPTS[0]).headers["x-loraplex-replica"] for _ in range(6)}
    jobs = ADAPTERS * 3
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(complete, url, name, PROMPTS[0], max_tokens=LONG_TOKENS)
                   for name in jobs]
        time.sleep(0.5)  # requests are in flight on both replicas
        victim = sorted(before)[0]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=False)
        responses = [f.result() for f in futures]
    for name, r in zip(jobs, responses):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected_long[name]
        assert r.headers["x-loraplex-replica"] != victim or r.headers["x-loraplex-attempt"] == "1"
    # the kill hit requests in flight, and the ingress sent them again
    assert any(r.headers["x-loraplex-attempt"] == "2" for r in responses), [
        (r.headers["x-loraplex-replica"], r.headers["x-loraplex-attempt"]) for r in responses]
    # Ray replaces the replica; the new one serves requests
    deadline = time.monotonic() + 240
    seen: set[str] = set()
    while time.monotonic() < deadline:
        with ThreadPoolExecutor(4) as pool:
            rs = list(pool.map(lambda _: complete(url, BASE, PROMPTS[0]), range(4)))
        assert all(r.status_code == 200 for r in rs)
        seen |= {r.headers["x-loraplex-replica"] for r in rs}
        if seen - before and _replicas_running() == 2:
            break
        time.sleep(2)
    else:
        pytest.fail(f"no replacement replica served a request; seen {seen}, before {before}")


def test_a_stream_whose_replica_dies_ends_with_an_error_event(cluster):
    url = cluster["url"]
    body = {"model": ADAPTERS[1], "prompt": PROMPTS[2], "max_tokens": 200, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        events = r.iter_lines()
        first = next(e for e in events if e.startswith("data: "))
        assert '"text"' in first  # a token reached the client: no retry is possible now
        victim = r.headers["x-loraplex-replica"]
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=False)
        rest = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    error = json.loads(rest[-2])["error"]
    assert error["code"] == "replica_failed" and error["type"] == "ServiceUnavailableError"
    assert complete(url, ADAPTERS[1], PROMPTS[0]).status_code == 200  # the survivor serves


def test_the_documented_serve_run_config_and_the_cli_flags_build_the_same_config(tmp_path):
    import argparse

    import yaml

    from loraplex.serve_ray.app import app_builder
    from loraplex.serve_ray.config import RayServeConfig, add_serve_ray_args, config_from_args

    for d in ("m", "sql", "chat"):
        (tmp_path / d).mkdir()
    doc = yaml.safe_load((Path(__file__).parents[1] / "docs" / "serve_ray.yaml").read_text())
    args = doc["applications"][0]["args"]
    assert doc["applications"][0]["import_path"] == "loraplex.serve_ray.app:app_builder"
    args.update(model=str(tmp_path / "m"),
                adapters={k: str(tmp_path / k) for k in args["adapters"]})
    from_yaml = RayServeConfig(**args)
    assert isinstance(app_builder(args), serve.Application)
    flags = add_serve_ray_args(argparse.ArgumentParser()).parse_args([
        "--model", str(tmp_path / "m"), "--replicas", "2", "--num-cpus-per-replica", "4",
        "--num-gpus-per-replica", "1", "--max-loras-per-replica", "16",
        "--adapter", f"sql={tmp_path / 'sql'}", "--adapter", f"chat={tmp_path / 'chat'}"])
    from_cli = config_from_args(flags)
    for field in ("model", "adapters", "replicas", "num_cpus_per_replica",
                  "num_gpus_per_replica", "max_loras_per_replica", "max_ongoing_requests"):
        assert getattr(from_cli, field) == getattr(from_yaml, field), field
    with pytest.raises(ValueError, match="not a directory"):
        RayServeConfig(model=str(tmp_path / "m"), adapters={"x": str(tmp_path / "nope")})
