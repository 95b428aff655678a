"""The adapter subsystem's owners: registry generations, unload/reload semantics, the slot
pool's pins, the bytes-bounded host cache, and adapter I/O off the engine thread."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers_lora import make_peft_adapter, make_tiny_model, peft_reference

from loraplex import LLM, AdapterExistsError, InvalidRequestError, SamplingParams
from loraplex.lora.adapter import LoRAAdapter, LoRAWeights
from loraplex.lora.host_cache import HostCache

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry")
    d, hf = make_tiny_model(tmp / "base", "llama")
    dirs = {n: str(make_peft_adapter(hf, tmp / n, seed=10 + i, r=4, lora_alpha=8, b_scale=0.5))
            for i, n in enumerate(["old", "new", "other"])}
    return str(d), hf, dirs


def _peft_tokens(hf, adapter_dir: str, ids: list[int], n: int) -> list[int]:
    ref = peft_reference(hf, adapter_dir)
    with torch.no_grad():
        out = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                           eos_token_id=None, min_new_tokens=n)
    return out[0, len(ids):].tolist()


def _drain(engine) -> dict[str, object]:
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


def _assert_pins_consistent(engine) -> None:
    """Every pin in the pool belongs to exactly one live sequence holding that slot."""
    sched, pool = engine.scheduler, engine.lora_pool
    holders = [s for s in [*sched.running, *sched.waiting] if s.lora_slot is not None]
    assert sum(pool.pins) == len(holders)
    for s in holders:
        assert pool.keys[s.lora_slot] == (s.adapter, s.adapter_generation)


def test_reload_serves_new_weights_while_running_request_keeps_old(base):
    d, hf, dirs = base
    llm = LLM(d, adapters={"X": dirs["old"]}, device="cpu", max_loras_per_batch=2,
              max_lora_rank=8)
    engine = llm.engine
    prompt = [1, 7, 8, 9]
    engine.add_request("running", prompt, GREEDY, "X")
    engine.step()  # prefill: pinned on the old generation
    old_gen = engine.check_adapter("X").generation
    llm.unload_adapter("X")
    llm.load_adapter("X", dirs["new"])
    assert engine.check_adapter("X").generation > old_gen
    engine.add_request("after", prompt, GREEDY, "X")
    done = _drain(engine)
    assert done["running"].token_ids == _peft_tokens(hf, dirs["old"], prompt, 6)
    assert done["after"].token_ids == _peft_tokens(hf, dirs["new"], prompt, 6)
    assert done["running"].token_ids != done["after"].token_ids  # the test can tell them apart
    assert sum(engine.lora_pool.pins) == 0
    # the retired slot is gone for good: only the new generation remains resident
    assert [k for k in engine.lora_pool.keys if k is not None] == [("X", old_gen + 1)]


def test_queued_request_for_unloaded_adapter_ends_with_error_naming_it(base):
    d, _, dirs = base
    llm = LLM(d, adapters={"X": dirs["old"]}, device="cpu", max_num_seqs=1, max_lora_rank=8)
    engine = llm.engine
    engine.add_request("first", [1, 5, 6], GREEDY, None)
    engine.add_request("queued", [1, 5, 7], GREEDY, "X")
    engine.step()  # max_num_seqs=1: "queued" waits behind "first"
    assert engine.scheduler.waiting[0].request_id == "queued"
    llm.unload_adapter("X")
    done = _drain(engine)
    assert done["queued"].finish_reason == "error"
    assert "'X'" in done["queued"].error and "unloaded" in done["queued"].error
    assert done["first"].finish_reason == "length" and len(done["first"].token_ids) == 6


def test_pins_return_to_zero_after_preemption_and_aborts(base):
    d, hf, dirs = base
    # 6 KV blocks of 16 tokens for 6 sequences that grow to 3 blocks each: decode preempts
    llm = LLM(d, adapters=dirs, device="cpu", max_loras_per_batch=2, max_lora_rank=8,
              num_kv_blocks=6)
    engine = llm.engine
    names = ["old", "new", "other", None, "old", "new"]
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    for i, name in enumerate(names):
        engine.add_request(f"r{i}", [1, 4 + i, 9, 12], sp, name)
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        _assert_pins_consistent(engine)
        steps += 1
        if steps == 3:
            engine.abort_request("r1")  # running or waiting, its pin (if any) must go
        if steps == 6:
            engine.abort_request("r4")
    assert engine.scheduler.num_preemptions > 0
    assert sum(engine.lora_pool.pins) == 0 and engine.stats()["num_pinned_slots"] == 0


def _fake_adapter(name: str, nbytes_per_tensor: int) -> LoRAAdapter:
    n = nbytes_per_tensor // 4
    w = LoRAWeights(torch.zeros(1, n), torch.zeros(n, 1), 1.0)
    return LoRAAdapter(name, "<mem>", {(0, "q_proj"): w})


def test_host_cache_bounded_in_bytes_and_count():
    one = _fake_adapter("a", 1000).nbytes  # 2000 bytes
    cache = HostCache(max_count=None, max_bytes=3 * one)
    for i in range(5):
        cache.put((f"a{i}", i), _fake_adapter(f"a{i}", 1000))
        assert cache.nbytes <= 3 * one
    assert len(cache) == 3 and ("a4", 4) in cache and ("a0", 0) not in cache
    assert cache.get(("a2", 2)) is not None  # now most recent: survives the next put
    cache.put(("a5", 5), _fake_adapter("a5", 1000))
    assert ("a2", 2) in cache and ("a3", 3) not in cache
    counted = HostCache(max_count=2, max_bytes=1 << 30)
    for i in range(4):
        counted.put((f"b{i}", i), _fake_adapter(f"b{i}", 1000))
    assert len(counted) == 2 and counted.nbytes == 2 * one


def test_engine_host_cache_respects_byte_bound_and_serving_dtype(base):
    d, hf, dirs = base
    probe = LLM(d, adapters={"old": dirs["old"]}, device="cpu", max_lora_rank=8)
    one = probe.engine.check_adapter("old").nbytes
    llm = LLM(d, adapters=dirs, device="cpu", max_loras_per_batch=1, max_lora_rank=8,
              max_cpu_lora_bytes=one + one // 2)  # room for one adapter at a time
    engine = llm.engine
    assert len(engine.lora_cache) == 1 and engine.lora_cache.nbytes <= one + one // 2
    names = ["old", "new", "other", "old"]
    outs = llm.generate([[1, 5, 6, 7]] * 4, GREEDY, adapters=names)
    assert engine.stats()["adapter_disk_loads"] > 0
    assert engine.lora_cache.nbytes <= one + one // 2
    for name, out in zip(names, outs, strict=True):
        assert out.token_ids == _peft_tokens(hf, dirs[name], [1, 5, 6, 7], 6), name
    with pytest.raises(ValueError, match="max_cpu_lora_bytes"):
        LLM(d, device="cpu", max_cpu_lora_bytes=0)
    # the cache keeps the serving dtype, not float32 copies
    loader = engine.lora_loader
    loader.dtype = torch.float16  # as an engine serving float16 would have it
    adapter = loader.parse("old", dirs["old"])
    assert {w.a.dtype for w in adapter.weights.values()} == {torch.float16}
    assert adapter.nbytes * 2 == one


def test_slow_adapter_read_does_not_stall_running_requests(base, monkeypatch):
    d, hf, dirs = base
    llm = LLM(d, adapters={"X": dirs["old"]}, device="cpu", max_lora_rank=8, max_cpu_loras=1)
    engine = llm.engine
    llm.load_adapter("Y", dirs["new"])  # the 1-entry host cache now holds only Y
    assert ("X", engine.check_adapter("X").generation) not in engine.lora_cache
    release, entered = threading.Event(), threading.Event()
    parse = engine.lora_loader.parse

    def slow_parse(name, path):
        entered.set()
        assert release.wait(60), "test never released the parse"
        return parse(name, path)

    monkeypatch.setattr(engine.lora_loader, "parse", slow_parse)
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    engine.add_request("base", [1, 5, 6], sp, None)
    engine.step()  # "base" runs
    engine.add_request("cold", [1, 5, 7], GREEDY, "X")  # X must be read again from disk
    engine.add_request("behind", [1, 5, 8], sp, None)  # queued after the cold request
    assert entered.wait(60)
    tokens_while_loading = {"base": 0, "behind": 0}
    for _ in range(5):  # the parse is blocked: steps still run, "behind" is admitted
        for out in engine.step():
            tokens_while_loading[out.request_id] += 1
    assert tokens_while_loading["base"] >= 4 and tokens_while_loading["behind"] >= 4
    assert [s.request_id for s in engine.scheduler.waiting] == ["cold"]  # waiting, not failed
    release.set()
    done = _drain(engine)
    assert done["cold"].token_ids == _peft_tokens(hf, dirs["old"], [1, 5, 7], 6)


def test_registration_parses_off_the_calling_thread_and_reports_errors(base, monkeypatch):
    d, _, dirs = base
    llm = LLM(d, device="cpu", max_lora_rank=8)
    engine = llm.engine
    release = threading.Event()
    parse = engine.lora_loader.parse

    def blocked_parse(name, path):
        assert release.wait(60), "test never released the parse"
        return parse(name, path)

    monkeypatch.setattr(engine.lora_loader, "parse", blocked_parse)
    fut = engine.submit_adapter_load("Z", dirs["other"])
    engine.add_request("r", [1, 5, 6], GREEDY, None)
    assert len(_drain(engine)["r"].token_ids) == 6  # steps ran while the parse was blocked
    assert not fut.done() and "Z" not in llm.list_adapters()
    release.set()
    assert fut.result(60).name == "Z" and llm.list_adapters() == ["Z"]
    with pytest.raises(AdapterExistsError, match="'Z'"):
        llm.load_adapter("Z", dirs["old"])
    assert isinstance(AdapterExistsError("x"), InvalidRequestError)


@pytest.fixture(scope="module")
def plain_llm(base):
    return LLM(base[0], device="cpu", max_lora_rank=8)


@pytest.mark.parametrize("name", ["", "a\nb", "x" * 129, "a b", 5])
def test_adapter_names_are_validated(base, plain_llm, name):
    with pytest.raises(InvalidRequestError, match="adapter name"):
        plain_llm.load_adapter(name, base[2]["old"])
    assert plain_llm.list_adapters() == []
    plain_llm.load_adapter("ok.name:v1/x-2_3", base[2]["old"])  # the allowed alphabet
    plain_llm.unload_adapter("ok.name:v1/x-2_3")


def test_staged_slot_write_packs_each_layer_into_one_copy(base):
    """The staged path (pinned buffer + one host->device copy per layer, the CUDA path) lays
    the weights out exactly as direct per-projection copies do."""
    from loraplex.lora.buffers import LoRABuffers
    from loraplex.lora.peft_loader import load_peft_adapter
    from loraplex.models.loader import load_model_config

    d, _, dirs = base
    cfg, _ = load_model_config(d)
    adapter = load_peft_adapter(dirs["old"], cfg, 8, name="old")
    cpu = torch.device("cpu")
    direct = LoRABuffers(cfg, 3, 8, torch.float32, cpu, staged=False)
    staged = LoRABuffers(cfg, 3, 8, torch.float32, cpu, staged=True)
    for bufs in (direct, staged):
        bufs.write(2, adapter)
    assert staged.num_transfers == cfg.num_layers
    for key, want in direct.buffers.items():
        got = staged.buffers[key]
        for name in ("a", "b", "ranks", "scalings"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (key, name)
    # and the direct copy holds the adapter's weights where the ops read them
    w = adapter.weights[(1, "v_proj")]
    qkv = direct.buffers[(1, "qkv_proj")]
    assert torch.equal(qkv.a[2, 2 * 8 : 2 * 8 + w.rank], w.a)
    assert torch.equal(qkv.b[2, qkv.offsets[2] : qkv.offsets[3], : w.rank], w.b)
    assert qkv.ranks[2, 2].item() == w.rank and qkv.ranks[0].sum().item() == 0


def test_cold_adapter_whose_files_vanished_fails_alone(base, tmp_path):
    import shutil

    d, _, dirs = base
    doomed = tmp_path / "doomed"
    shutil.copytree(dirs["old"], doomed)
    llm = LLM(d, adapters={"X": str(doomed)}, device="cpu", max_lora_rank=8, max_cpu_loras=1)
    engine = llm.engine
    llm.load_adapter("Y", dirs["new"])  # X leaves the 1-entry host cache; it has no slot
    shutil.rmtree(doomed)
    engine.add_request("base", [1, 5, 6], GREEDY, None)
    engine.add_request("cold", [1, 5, 7], GREEDY, "X")
    done = _drain(engine)
    assert done["cold"].finish_reason == "error"
    assert "'X'" in done["cold"].error and "does not exist" in done["cold"].error
    assert done["base"].finish_reason == "length" and len(done["base"].token_ids) == 6
    assert sum(engine.lora_pool.pins) == 0
