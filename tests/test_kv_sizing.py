"""KV cache sizing (the budget arithmetic, the CUDA path with the memory queries mocked, the
CPU engine with an explicit budget) and engine-argument validation."""

from __future__ import annotations

import gc
import logging

import numpy as np
import pytest
import torch
from helpers_lora import make_peft_adapter, make_tiny_model

from loraplex import LLM
from loraplex.cli import main as cli_main
from loraplex.cli import parse_size
from loraplex.config import CacheConfig
from loraplex.errors import CapacityError, ConfigError
from loraplex.kvcache import sizing
from loraplex.kvcache.sizing import (
    GRAPH_RESERVE_BYTES,
    MemorySplit,
    Profile,
    cuda_graph_reserve,
    kv_cache_bytes,
    num_kv_blocks,
    profile_lengths,
)

GiB = 1 << 30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kv")
    d, hf = make_tiny_model(tmp / "base", "llama")
    return str(d), hf, str(make_peft_adapter(hf, tmp / "a0", seed=0, r=4))


# -- the budget ----------------------------------------------------------------------------------
def test_kv_cache_bytes_is_utilization_minus_peak_minus_reserve():
    assert kv_cache_bytes(140 * GiB, 0.9, 20 * GiB, GiB) == int(126 * GiB) - 21 * GiB
    assert kv_cache_bytes(80 * GiB, 1.0, 0) == 80 * GiB
    assert kv_cache_bytes(10 * GiB, 0.5, 6 * GiB) < 0  # already over: the caller errors


def test_profile_lengths_cover_the_largest_step():
    assert profile_lengths(8192, 2048) == [2048] * 4
    assert profile_lengths(1000, 300) == [300, 300, 300, 100]
    assert profile_lengths(100, 300) == [300]  # a prompt longer than the budget runs alone


def test_graph_reserve_counts_every_captured_logits_buffer():
    # sizes 1, 2, 4 -> 7 rows, twice (with and without LoRA), float32
    assert cuda_graph_reserve([1, 2, 4], 1000) == GRAPH_RESERVE_BYTES + 2 * 7 * 1000 * 4


def _mock_cuda(monkeypatch, total: int) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (total // 2, total))


def test_cuda_budget_from_the_profiled_peak(monkeypatch, caplog):
    _mock_cuda(monkeypatch, 80 * GiB)
    bpb, calls = 2 << 20, []

    def profile():
        calls.append(1)
        return Profile(in_use=30 * GiB, activations=4 * GiB, free=45 * GiB)

    cache = CacheConfig(gpu_memory_utilization=0.5)
    with caplog.at_level(logging.INFO, logger=sizing.__name__):
        n = num_kv_blocks(cache, bpb, 4096, torch.device("cuda"), MemorySplit(20 * GiB, GiB),
                          profile=profile, graph_reserve=GiB)
    assert calls == [1]
    assert n == (40 * GiB - 30 * GiB - GiB) // bpb - 1  # one block pads CUDA graphs
    msg = caplog.text
    assert f"{n} blocks" in msg and f"{n * 16} tokens" in msg
    assert "weights 20.00" in msg and "adapters 1.00" in msg and "activations peak 4.00" in msg


def test_explicit_budget_skips_the_profile(monkeypatch):
    _mock_cuda(monkeypatch, 80 * GiB)

    def profile():
        raise AssertionError("profiled although kv_cache_memory_bytes was given")

    cache = CacheConfig(kv_cache_memory_bytes=GiB)
    assert num_kv_blocks(cache, 1 << 20, 4096, torch.device("cuda"), MemorySplit(0, 0),
                         profile=profile) == 1023
    assert num_kv_blocks(CacheConfig(num_blocks=7), 1 << 20, 4096, torch.device("cuda"),
                         MemorySplit(0, 0), profile=profile) == 7


@pytest.mark.parametrize("peak", [35 * GiB, 50 * GiB])  # a little room, none at all
def test_too_little_memory_for_one_sequence_names_the_knobs(monkeypatch, peak):
    _mock_cuda(monkeypatch, 80 * GiB)
    cache = CacheConfig(gpu_memory_utilization=0.5)
    with pytest.raises(CapacityError) as e:
        num_kv_blocks(cache, 1 << 20, 32768, torch.device("cuda"), MemorySplit(0, 0),
                      profile=lambda: Profile(peak, 0, 80 * GiB - peak), graph_reserve=4 * GiB)
    for knob in ("gpu_memory_utilization", "max_model_len=32768", "kv_cache_memory_bytes",
                 "--kv-cache-memory"):
        assert knob in str(e.value)


def test_budget_beyond_free_memory_is_an_error_not_a_later_oom(monkeypatch):
    _mock_cuda(monkeypatch, 80 * GiB)  # e.g. another engine already holds 60 GiB
    cache = CacheConfig(gpu_memory_utilization=0.5)
    with pytest.raises(CapacityError, match="only 15.00 GiB are free") as e:
        num_kv_blocks(cache, 1 << 20, 4096, torch.device("cuda"), MemorySplit(0, 0),
                      profile=lambda: Profile(5 * GiB, GiB, 16 * GiB), graph_reserve=GiB)
    assert "gpu_memory_utilization" in str(e.value)


@pytest.mark.parametrize("value", [0, 0.0, -0.1, 1.01, 2, float("nan"), True, "0.9"])
def test_gpu_memory_utilization_outside_0_1_is_refused(value):
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=value)


def test_gpu_memory_utilization_edges_are_accepted():
    assert CacheConfig(gpu_memory_utilization=1).gpu_memory_utilization == 1
    assert CacheConfig(gpu_memory_utilization=1e-3).gpu_memory_utilization == 1e-3
    # numpy scalars are numbers too (a sweep script's np.arange); numpy bools are not
    assert CacheConfig(num_blocks=np.int64(5), gpu_memory_utilization=np.float32(0.5))
    with pytest.raises(ConfigError, match="num_kv_blocks"):
        CacheConfig(num_blocks=np.bool_(True))


# -- a real CPU engine -------------------------------------------------------------------------
def _bytes_per_block(llm) -> int:
    k, v = llm.engine.kv_caches[0]
    return 2 * len(llm.engine.kv_caches) * k[0].nbytes


def test_cpu_engine_explicit_budget_and_default(tiny, caplog):
    d, _, _ = tiny
    with caplog.at_level(logging.INFO, logger=sizing.__name__):
        llm = LLM(d, device="cpu", kv_cache_memory_bytes=1 << 20)
    bpb = _bytes_per_block(llm)
    assert llm.engine.blocks.num_blocks == (1 << 20) // bpb - 1
    assert len(llm.engine.kv_caches[0][0]) == (1 << 20) // bpb  # + the padding block
    assert f"{llm.engine.blocks.num_blocks} blocks" in caplog.text
    default = LLM(d, device="cpu", num_kv_blocks=None)
    assert default.engine.blocks.num_blocks == GiB // bpb - 1


def test_cpu_engine_budget_below_one_sequence_is_a_startup_error(tiny):
    d, _, _ = tiny  # max_model_len 256 = 16 blocks
    llm = LLM(d, device="cpu", kv_cache_memory_bytes=1 << 20)
    bpb = _bytes_per_block(llm)
    with pytest.raises(CapacityError, match="max_model_len=256") as e:
        LLM(d, device="cpu", kv_cache_memory_bytes=8 * bpb)
    assert "--kv-cache-memory" in str(e.value)
    ok = LLM(d, device="cpu", kv_cache_memory_bytes=8 * bpb, max_model_len=100)
    assert ok.engine.blocks.num_blocks == 7


# -- engine arguments (regressions: these fell back to defaults or raised raw errors) -----------
@pytest.mark.parametrize("kwargs,name", [
    (dict(max_model_len=0), "max_model_len"),
    (dict(max_model_len=-5), "max_model_len"),
    (dict(num_kv_blocks=0), "num_kv_blocks"),
    (dict(num_kv_blocks=-3), "num_kv_blocks"),
    (dict(max_num_batched_tokens=0), "max_num_batched_tokens"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(max_num_seqs=True), "max_num_seqs"),
    (dict(max_model_len=True), "max_model_len"),
    (dict(max_lora_rank=False), "max_lora_rank"),
    (dict(num_kv_blocks=2.5), "num_kv_blocks"),
    (dict(kv_cache_memory_bytes=0), "kv_cache_memory_bytes"),
    (dict(gpu_memory_utilization=0), "gpu_memory_utilization"),
    (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
])
def test_bad_engine_limits_raise_naming_the_argument(tiny, kwargs, name):
    d, _, _ = tiny
    with pytest.raises(ConfigError, match=name):
        LLM(d, device="cpu", **kwargs)


def test_adapters_as_a_list_is_a_typed_error(tiny):
    d, _, adapter = tiny
    with pytest.raises(TypeError, match="adapters must be a dict") as e:
        LLM(d, device="cpu", adapters=[adapter])
    assert isinstance(e.value, ConfigError)
    with pytest.raises(ConfigError, match="adapters"):
        LLM(d, device="cpu", adapters={"a": 3})
    llm = LLM(d, device="cpu", adapters={"a0": adapter}, num_kv_blocks=64)
    assert llm.list_adapters() == ["a0"]


# -- CLI -------------------------------------------------------------------------------------------
def test_parse_size():
    assert parse_size("2GiB") == 2 * GiB
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("1048576") == 1 << 20
    for bad in ("lots", "2XB", "0", "-1GiB"):
        with pytest.raises(Exception, match="size|byte"):
            parse_size(bad)


def test_cli_kv_cache_memory_flag_reaches_the_engine(tiny, capsys):
    d, _, _ = tiny
    rc = cli_main(["generate", "--model", d, "--device", "cpu", "--kv-cache-memory", "64KiB",
                   "--prompt", "hi", "--max-tokens", "2"])
    assert rc == 2 and "--kv-cache-memory" in capsys.readouterr().err
    rc = cli_main(["generate", "--model", d, "--device", "cpu", "--kv-cache-memory", "1MiB",
                   "--gpu-memory-utilization", "0.5", "--prompt", "hi", "--max-tokens", "2"])
    assert rc == 0
    rc = cli_main(["generate", "--model", d, "--device", "cpu",
                   "--gpu-memory-utilization", "1.5", "--prompt", "hi"])
    assert rc == 2 and "gpu_memory_utilization" in capsys.readouterr().err


# -- CUDA: the profiled budget holds -------------------------------------------------------------
@pytest.mark.gpu
def test_cuda_engines_stay_within_their_gpu_memory_utilization(tiny):
    d, _, adapter = tiny
    gc.collect()
    torch.cuda.empty_cache()  # engines of earlier tests in this process
    free, total = torch.cuda.mem_get_info()
    util = 0.2
    if total - free > total * util / 2:
        pytest.skip("the GPU is already busy")
    kw = dict(device="cuda", dtype="bfloat16", adapters={"a0": adapter},
              gpu_memory_utilization=util, max_num_seqs=8)
    first = LLM(d, **kw)
    first.generate([[1, 5, 6]], adapters=["a0"])  # a step after the graphs were captured
    used = total - torch.cuda.mem_get_info()[0]
    kv = sum(k.nbytes + v.nbytes for k, v in first.engine.kv_caches)
    assert kv > total * util / 2  # the cache took most of the budget (tiny model)...
    assert used <= total * util  # ...and everything together stays within it
    # the fraction is per engine (as in vLLM): a second one gets about the same cache
    second = LLM(d, **kw)
    second.generate([[1, 5, 6]], adapters=["a0"])
    kv2 = sum(k.nbytes + v.nbytes for k, v in second.engine.kv_caches)
    assert abs(kv2 - kv) < 0.02 * kv
    assert total - torch.cuda.mem_get_info()[0] <= 2 * total * util


def test_serve_flags_reach_the_engine(tiny, capsys):
    pytest.importorskip("fastapi")
    d, _, _ = tiny
    with pytest.raises(SystemExit):
        cli_main(["serve", "--model", d, "--kv-cache-memory", "lots"])
    assert "--kv-cache-memory" in capsys.readouterr().err
    # refused by the engine before the server starts: the flag went through run_server
    assert cli_main(["serve", "--model", d, "--device", "cpu",
                     "--gpu-memory-utilization", "0"]) == 2
    assert "gpu_memory_utilization=0" in capsys.readouterr().err
    assert cli_main(["serve", "--model", d, "--device", "cpu", "--kv-cache-memory", "64KiB"]) == 2
    assert "max_model_len" in capsys.readouterr().err


def test_profiled_step_runs_the_largest_prefill_through_lora(tiny):
    """The profile's forward on CPU: every token of the largest step goes through the LoRA
    path, spread over the adapter slots, and no KV cache is written."""
    from loraplex.kvcache.profile import largest_step

    d, _, _ = tiny
    llm = LLM(d, device="cpu", max_num_batched_tokens=600, max_model_len=256, max_num_seqs=4,
              num_kv_blocks=64)
    engine = llm.engine
    before = [k.clone() for k, _ in engine.kv_caches]
    run = largest_step(engine.runner.model, engine.scheduler.cfg, engine.lora_batches, 8,
                       engine.device)
    run()
    batch = engine.lora_batches.batch
    assert batch.num_tokens == 600 and batch.num_segs == 3  # 256 + 256 + 88, slots 0, 1, 2
    assert all(torch.equal(b, k) for b, (k, _) in zip(before, engine.kv_caches))
