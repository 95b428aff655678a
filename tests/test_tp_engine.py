"""Tensor parallelism's process model on CPU (gloo): rank 0 schedules and samples, worker
processes run every model call on their shard.

References: the same engine at tensor_parallel_size=1 (greedy tokens equal, logprobs within
1e-5 in float32), for the same requests, adapter loads and unloads; the typed errors a user
can cause. A killed worker must end every request with ``TensorParallelError`` within a
deadline (no hang) and leave no process behind.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch
from helpers_lora import make_peft_adapter, make_tiny_model
from server_utils import ServerProcess

from loraplex import LLM, SamplingParams
from loraplex.distributed.parallel_state import all_reduce_, tp_size
from loraplex.engine.llm_engine import LLMEngine
from loraplex.errors import (
    AdapterLoadError,
    ConfigError,
    ConfigTypeError,
    TensorParallelError,
)

# 6 heads and 2 KV heads (tiny shape): TP=2 splits both. Prompts share a 24-token prefix so
# the second round starts from cached blocks.
PREFIX = [(7 * j + 3) % 120 + 4 for j in range(24)]
PROMPTS = [PREFIX + [10 + i, 20 + i, 30 + i][: 1 + i % 3] for i in range(6)]
NAMES = ["a", None, "b", "a", None, "b"]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, logprobs=2)
PROMPT_LP = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2)
ENGINE = dict(device="cpu", max_num_batched_tokens=16, max_loras_per_batch=2,
              num_kv_blocks=64, enable_prefix_caching=True, enable_chunked_prefill=True)


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("tp")
    model, hf = make_tiny_model(root / "tiny")
    adapters = {"a": str(make_peft_adapter(hf, root / "a", seed=11)),
                "b": str(make_peft_adapter(hf, root / "b", seed=12, r=4,
                                           rank_pattern={"o_proj": 2}))}
    late = str(make_peft_adapter(hf, root / "c", seed=13, r=16,
                                 target_modules=["q_proj", "v_proj", "down_proj"]))
    # 8 heads, 2 KV heads: TP=4 splits the heads and replicates each KV head over 2 ranks
    wide, wide_hf = make_tiny_model(root / "wide", seed=4, hidden_size=128,
                                    num_attention_heads=8, num_key_value_heads=2)
    wide_adapter = str(make_peft_adapter(wide_hf, root / "wa", seed=14))
    # lm_head LoRA: its B is split by vocabulary rows like the lm_head itself
    head_adapter = str(make_peft_adapter(wide_hf, root / "wh", seed=15, b_scale=4.0,
                                         target_modules=["lm_head", "q_proj"]))
    return SimpleNamespace(root=root, model=str(model), adapters=adapters, late=late,
                           wide=str(wide), wide_adapter=wide_adapter, head_adapter=head_adapter)


def scenario(llm: LLM, late: str) -> list:
    """Mixed adapter and base rows in one batch, 16-token steps (chunked prefill), two rounds
    (the second from the prefix cache), prompt logprobs, then an adapter loaded and another
    unloaded while requests run, and scores. Returns everything comparable."""
    params = [GREEDY] * 5 + [PROMPT_LP]
    outs = [o for _ in range(2) for o in llm.generate(PROMPTS, params, adapters=NAMES)]
    engine = llm.engine
    engine.add_request("r0", PROMPTS[0], GREEDY, "b")
    engine.add_request("r1", PROMPTS[1], GREEDY, None)
    done = {o.request_id: o for o in engine.step() if o.finished}
    engine.load_adapter("c", late)  # while r0 and r1 run
    engine.add_request("r2", PROMPTS[2], GREEDY, "c")
    for _ in range(3):
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    engine.unload_adapter("b")  # r0 finishes on b's weights
    engine.add_request("r3", PROMPTS[3], GREEDY, "a")
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    outs += [done[f"r{i}"] for i in range(4)]
    scores = llm.score([PROMPTS[0], PROMPTS[4][:9]], adapters=["c", None])
    return [outs, scores, engine.stats()["prefix_cache_hits"]]


def assert_same(want: list, got: list) -> None:
    (w_outs, w_scores, _), (g_outs, g_scores, hits) = want, got
    assert hits > 0  # the second round really read cached blocks
    assert len(g_outs) == len(w_outs) == 16
    for w, g in zip(w_outs, g_outs, strict=True):
        assert g.token_ids == w.token_ids and g.finish_reason == w.finish_reason
        for lw, lg in ((w.logprobs or [], g.logprobs or []),
                       ((w.prompt_logprobs or [])[1:], (g.prompt_logprobs or [])[1:])):
            assert len(lw) == len(lg)
            for a, b in zip(lw, lg, strict=True):
                assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5
                assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert any(g.prompt_logprobs for g in g_outs)
    for w, g in zip(w_scores, g_scores, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def reference(assets) -> list:
    """The scenario at tensor_parallel_size=1 (built while no group is open)."""
    with LLM(assets.model, adapters=assets.adapters, **ENGINE) as llm:
        return scenario(llm, assets.late)


def test_tp2_equals_tp1_with_mixed_adapters_chunks_cache_and_runtime_loads(assets, reference):
    with LLM(assets.model, adapters=assets.adapters, tensor_parallel_size=2, **ENGINE) as llm:
        procs = llm.engine.tp_peer.procs
        assert len(procs) == 1 and procs[0].is_alive() and tp_size() == 2
        got = scenario(llm, assets.late)
    assert_same(reference, got)
    assert tp_size() == 1 and procs[0].exitcode == 0  # close() stopped the worker cleanly
    assert not multiprocessing.active_children()


def test_tp4_engine_equals_tp1(assets):
    """TP=4 (kv heads replicated over 2 ranks each), decode graphs' static buffers, and an
    lm_head LoRA (vocabulary-parallel B) next to a plain adapter and base rows."""
    prompts = [PREFIX[: 5 + 3 * i] for i in range(5)]
    names = ["wa", None, "wh", None, "wa"]
    kw = dict(ENGINE, adapters={"wa": assets.wide_adapter, "wh": assets.head_adapter},
              cuda_graphs=True, enable_lm_head_lora=True)
    tokens, scores = [], []
    for tp in (1, 4):
        engine = LLMEngine.from_args(assets.wide, tensor_parallel_size=tp, **kw)
        try:
            for i, (p, a) in enumerate(zip(prompts, names)):
                engine.add_request(f"q{i}", p, SamplingParams(max_tokens=5, temperature=0.0), a)
            done = {}
            while engine.has_unfinished_requests():
                done.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
            tokens.append([done[f"q{i}"] for i in range(len(prompts))])
            scores.append(engine.score(prompts[:3], ["wh", None, "wa"]))
        finally:
            engine.close()
    assert tokens[0] == tokens[1]
    for w, g in zip(*scores, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    assert not multiprocessing.active_children()


def test_killed_worker_fails_every_request_without_hanging(assets):
    llm = LLM(assets.model, adapters=assets.adapters, tensor_parallel_size=2, **ENGINE)
    engine = llm.engine
    worker = engine.tp_peer.procs[0]
    for i, (p, a) in enumerate(zip(PROMPTS, NAMES)):
        engine.add_request(f"k{i}", p, SamplingParams(max_tokens=40, temperature=0.0), a)
    engine.step()
    running = [s for s in engine.requests.values()]
    # Rank 0 waits in a collective the worker never joins (as in a sharded forward whose
    # peer dies): the worker's death must end the wait with the typed error, not hang it.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(engine.tp_peer.guard, lambda: all_reduce_(torch.ones(4)))
        with pytest.raises(concurrent.futures.TimeoutError):
            waiting.result(timeout=0.5)  # really blocked
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(TensorParallelError, match=r"rank1 was killed by SIGKILL"):
            waiting.result(timeout=60)

        def drive() -> None:
            while engine.has_unfinished_requests():
                engine.step()

        with pytest.raises(TensorParallelError, match=r"rank1 was killed by SIGKILL"):
            pool.submit(drive).result(timeout=60)
    assert running and all(s.finish_reason == "error" and "SIGKILL" in s.error
                           for s in running)
    assert not engine.has_unfinished_requests() and not engine.requests
    with pytest.raises(TensorParallelError):  # the engine takes nothing new
        engine.add_request("late", PROMPTS[0], GREEDY, None)
    with pytest.raises(TensorParallelError):
        llm.generate(PROMPTS[:1], GREEDY)
    llm.close()
    assert not multiprocessing.active_children() and tp_size() == 1


def test_tensor_parallel_size_is_validated_before_any_process_starts(assets):
    with pytest.raises(ConfigTypeError, match="tensor_parallel_size"):
        LLM(assets.model, tensor_parallel_size="2", device="cpu")
    with pytest.raises(ConfigError, match="tensor_parallel_size=0"):
        LLM(assets.model, tensor_parallel_size=0, device="cpu")
    with pytest.raises(ConfigError, match=r"must divide num_attention_heads \(6\)"):
        LLM(assets.model, tensor_parallel_size=4, device="cpu")
    assert not multiprocessing.active_children()


def test_one_tensor_parallel_group_per_process_and_none_left_by_a_failed_start(assets):
    with LLM(assets.model, tensor_parallel_size=2, **ENGINE):
        with pytest.raises(ConfigError, match="is open in this process"):
            LLM(assets.model, **ENGINE)
    assert not multiprocessing.active_children()
    missing = str(Path(assets.root) / "missing")
    with pytest.raises(AdapterLoadError, match="missing"):  # read after the workers started
        LLM(assets.model, adapters={"x": missing}, tensor_parallel_size=2, **ENGINE)
    assert not multiprocessing.active_children() and tp_size() == 1


def test_server_with_tensor_parallel_size_2_answers_completions(assets, reference):
    args = ["--model", assets.model, "--tensor-parallel-size", "2", "--num-kv-blocks", "64"]
    for name, path in assets.adapters.items():
        args += ["--adapter", f"{name}={path}"]
    server = ServerProcess(args, Path(assets.root) / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="x", max_retries=0,
                               timeout=120)
        want = reference[0][2]  # PROMPTS[2] on "b", first round
        got = client.completions.create(model="b", prompt=PROMPTS[2], max_tokens=6,
                                        temperature=0)
        assert got.choices[0].text == want.text
        assert got.usage.completion_tokens == len(want.token_ids)
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        (worker,) = _spawned_children(server.proc.pid)
        os.kill(worker, signal.SIGKILL)
        # the first request fails in the step that finds the worker dead (500), or, when
        # its exit was seen first, is refused (503); later ones are refused
        for codes in ((500, 503), (503,)):
            with pytest.raises(openai.APIStatusError) as failed:
                client.completions.create(model="a", prompt=PROMPTS[0], max_tokens=4)
            assert failed.value.status_code in codes
            assert "rank1 was killed by SIGKILL" in failed.value.message
        health = httpx.get(f"{server.base_url}/health")
        assert health.status_code == 503 and "SIGKILL" in health.json()["status"]
    finally:
        server.stop()
    assert server.proc.returncode is not None


def _spawned_children(pid: int) -> list[int]:
    """Process ids started by ``pid`` with multiprocessing's spawn (Linux /proc; not its
    resource tracker)."""
    kids = [c for task in Path(f"/proc/{pid}/task").iterdir()
            for c in (task / "children").read_text().split()]
    return [int(c) for c in kids
            if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def test_lora_batch_and_forward_batch_survive_the_wire():
    """No process needed: what a worker rebuilds from a message equals what rank 0 built."""
    from loraplex.distributed.channel import from_wire, lora_recipe, pack_batch, to_wire
    from loraplex.layers.forward_context import ExtendRows, ForwardBatch
    from loraplex.layers.prefill_groups import plan_prefill
    from loraplex.lora.batch import LoRABatchBuilder

    sent, got = (LoRABatchBuilder(64, 8, torch.device("cpu")) for _ in range(2))
    # base rows first, between and after adapter rows (any order a batch may have)
    slots, lengths = [-1, 2, 2, -1, 0, 3, -1], [3, 1, 4, 2, 5, 1, 2]
    want = sent.prepare(slots, lengths)
    rebuilt = got.prepare(*lora_recipe(want)[:2], is_decode=lora_recipe(want)[2])
    n, k = want.num_tokens, want.num_segs
    assert (rebuilt.num_tokens, rebuilt.num_segs, rebuilt.max_seg_len) == (n, k,
                                                                            want.max_seg_len)
    for a, b in ((want.token_lora_slots[:n], rebuilt.token_lora_slots[:n]),
                 (want.seg_starts[:k], rebuilt.seg_starts[:k]),
                 (want.seg_lens[:k], rebuilt.seg_lens[:k]),
                 (want.seg_lora_slots[:k], rebuilt.seg_lora_slots[:k])):
        assert torch.equal(a, b)
    i64 = dict(dtype=torch.int64)
    batch = ForwardBatch(
        is_prefill=True, num_tokens=18, cu_seqlens=[0, 10, 18],
        prefill_groups=plan_prefill([0, 10], torch.device("cpu")),
        extend=ExtendRows(tokens=torch.arange(10, 18), cu_seqlens_q=torch.tensor([0, 8], **i64),
                          cu_seqlens_q_host=[0, 8], block_tables=torch.tensor([[3, 4]], **i64),
                          context_lens=torch.tensor([20], **i64), max_query_len=8,
                          max_context_len=20, context_lens_host=[20]),
        slot_mapping=torch.arange(100, 118), lora=want)
    hidden = torch.randn(3, 8, dtype=torch.bfloat16)
    devices: list[torch.Tensor] = []
    wire = to_wire((pack_batch(batch), hidden), devices)
    fields, h = from_wire(wire, torch.device("cpu"), [])
    assert not devices and torch.equal(h, hidden) and h.dtype == torch.bfloat16
    assert fields["lora"] == lora_recipe(want) and fields["cu_seqlens"] == [0, 10, 18]
    assert torch.equal(fields["slot_mapping"], batch.slot_mapping)
    assert torch.equal(fields["extend"].block_tables, batch.extend.block_tables)
    assert fields["extend"].cu_seqlens_q_host == [0, 8]
    assert [g.size for g in fields["prefill_groups"]] == [g.size for g in batch.prefill_groups]


@pytest.mark.gpu
def test_tp2_on_two_gpus_with_cuda_graphs_equals_tp1(assets):
    """NCCL, one GPU a rank, decode through CUDA graphs (each rank replays its own, the
    collectives inside), the memory profile run in lockstep. Needs 2 GPUs."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    import gc

    kw = dict(adapters=assets.adapters, device="cuda", dtype="float32", max_loras_per_batch=2,
              gpu_memory_utilization=0.3, max_num_seqs=8)
    outs = []
    for tp in (1, 2):
        with LLM(assets.model, tensor_parallel_size=tp, **kw) as llm:
            assert llm.engine.runner.graphs is not None  # decode steps replay graphs
            outs.append(llm.generate(PROMPTS, GREEDY, adapters=NAMES))
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    for w, g in zip(*outs, strict=True):
        assert g.token_ids == w.token_ids
        for a, b in zip(w.logprobs, g.logprobs, strict=True):
            assert abs(a.logprob - b.logprob) < 1e-4  # the split changes summation order
    assert not multiprocessing.active_children()


def test_a_worker_that_dies_before_joining_does_not_hang_the_start(tmp_path):
    """(Last in the file: the abandoned rendezvous thread waits out its store's timeout.)"""
    from loraplex.distributed.executor import join_group

    worker = multiprocessing.get_context("fork").Process(target=os._exit, args=(3,))
    worker.start()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        start = pool.submit(join_group, 2, f"file://{tmp_path / 'store'}", "gloo", [worker])
        with pytest.raises(TensorParallelError, match="exited with code 3 before joining"):
            start.result(timeout=30)
    assert tp_size() == 1
