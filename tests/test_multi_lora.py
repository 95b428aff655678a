"""Mixed batches over many PEFT adapters: every request must get what PEFT gives with that
adapter alone (logits and greedy tokens), through few slots and a small host cache."""

from __future__ import annotations

import pytest
import torch
from helpers_lora import make_peft_adapter, make_tiny_model, peft_reference

from loraplex import LLM, AdapterLoadError, AdapterNotFoundError, SamplingParams

ADAPTERS = {  # name -> make_peft_adapter kwargs
    "r1": dict(r=1, lora_alpha=2, target_modules=["q_proj", "v_proj"]),
    "r4": dict(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"]),
    "r8": dict(r=8, lora_alpha=16),
    "r16": dict(r=16, lora_alpha=8, target_modules=["gate_proj", "up_proj", "k_proj"]),
    "r32_rslora": dict(r=32, lora_alpha=16, use_rslora=True),
    "r64": dict(r=64, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "patterns": dict(r=8, lora_alpha=16, rank_pattern={"q_proj": 4, "layers.1.mlp.down_proj": 2},
                     alpha_pattern={"v_proj": 4, "o_proj": 3}),
    "layers": dict(r=8, lora_alpha=8, layers_to_transform=[0, 2]),
}


def _setup(tmp_path, arch):
    overrides = {"tie_word_embeddings": True} if arch == "qwen2" else {}
    d, hf = make_tiny_model(tmp_path / "base", arch, **overrides)
    if arch == "qwen2":
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if name.endswith(".bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        hf.save_pretrained(d)
    dirs = {name: make_peft_adapter(hf, tmp_path / name, seed=i, b_scale=0.5, **kw)
            for i, (name, kw) in enumerate(ADAPTERS.items())}
    return d, hf, dirs


def _assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_mixed_batch_equals_peft(tmp_path, arch):
    d, hf, dirs = _setup(tmp_path, arch)
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_loras_per_batch=8, max_lora_rank=64)
    names = list(dirs) + [None, None, "r8"]
    g = torch.Generator().manual_seed(5)
    prompts = [[1] + torch.randint(4, 120, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 30, (len(names),), generator=g)]
    scores = llm.score(prompts, adapters=names)
    gens = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                        adapters=names)
    refs = {name: peft_reference(hf, dirs[name]) for name in dirs}
    for ids, name, logits, gen in zip(prompts, names, scores, gens, strict=True):
        ref_model = hf if name is None else refs[name]
        x = torch.tensor([ids])
        with torch.no_grad():
            ref_logits = ref_model(input_ids=x).logits[0]
            ref_tokens = ref_model.generate(input_ids=x, max_new_tokens=24, do_sample=False,
                                            eos_token_id=None, min_new_tokens=24)[0, len(ids):]
        _assert_close(logits, ref_logits)
        if name is not None:  # the adapter really changes the model
            assert (ref_logits - hf(input_ids=x).logits[0]).abs().max() > 1e-3
        assert gen.token_ids == ref_tokens.tolist(), name


def test_many_adapters_through_few_slots_and_small_host_cache(tmp_path):
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    dirs = {f"a{i}": make_peft_adapter(hf, tmp_path / f"a{i}", seed=100 + i, r=4 + i,
                                       lora_alpha=8, b_scale=0.5) for i in range(12)}
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_loras_per_batch=4, max_cpu_loras=6, max_lora_rank=16)
    names = [f"a{i % 12}" for i in range(24)] + [None]
    prompts = [[1, 10 + i, 20 + i % 7, 30, 44 + i % 5] for i in range(len(names))]
    gens = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                        adapters=names)
    scores = llm.score(prompts, adapters=names)
    stats = llm.engine.stats()
    assert stats["adapter_evictions"] > 0 and stats["adapter_disk_loads"] > 0
    assert stats["num_pinned_slots"] == 0
    refs = {}
    for ids, name, gen, logits in zip(prompts, names, gens, scores, strict=True):
        ref_model = hf if name is None else refs.setdefault(name, peft_reference(hf, dirs[name]))
        x = torch.tensor([ids])
        with torch.no_grad():
            _assert_close(logits, ref_model(input_ids=x).logits[0])
            ref = ref_model.generate(input_ids=x, max_new_tokens=8, do_sample=False,
                                     eos_token_id=None, min_new_tokens=8)[0, len(ids):]
        assert gen.token_ids == ref.tolist(), name


def test_batch_never_exceeds_slot_count(tmp_path):
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    dirs = {f"a{i}": make_peft_adapter(hf, tmp_path / f"a{i}", seed=i, r=2) for i in range(5)}
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_loras_per_batch=2, max_lora_rank=8)
    engine = llm.engine
    seen = []
    run = engine.runner.run

    def spy(batch):
        seen.append({s.adapter for s in batch.seqs} - {None})
        return run(batch)

    engine.runner.run = spy
    names = [f"a{i % 5}" for i in range(10)]
    outs = llm.generate([[1, 5 + i] for i in range(10)], SamplingParams(max_tokens=3), names)
    assert all(o.finished for o in outs)
    assert max(len(s) for s in seen) == 2


def test_runtime_load_unload_while_running(tmp_path):
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    a = make_peft_adapter(hf, tmp_path / "a", seed=1, r=4)
    llm = LLM(str(d), device="cpu", max_loras_per_batch=2, max_lora_rank=8)
    assert llm.list_adapters() == []
    llm.load_adapter("a", str(a))
    assert llm.list_adapters() == ["a"]
    with pytest.raises(ValueError, match="already loaded"):
        llm.load_adapter("a", str(a))
    engine = llm.engine
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    expected = llm.generate([[1, 7, 8]], sp, adapters="a")[0].token_ids
    engine.add_request("r1", [1, 7, 8], sp, "a")
    engine.step()  # prefill: "a" pinned
    llm.unload_adapter("a")  # in flight: finishes; new requests refused
    with pytest.raises(AdapterNotFoundError, match="'a'"):
        engine.add_request("r2", [1, 2], sp, "a")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].token_ids == expected
    assert engine.stats()["num_pinned_slots"] == 0 and all(
        k is None or k[0] != "a" for k in engine.lora_pool.keys)
    llm.load_adapter("a", str(a))  # can come back
    assert llm.generate([[1, 7, 8]], sp, adapters="a")[0].token_ids == expected


def test_bad_adapter_is_refused_and_others_keep_serving(tmp_path):
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    good = make_peft_adapter(hf, tmp_path / "good", seed=1, r=4)
    llm = LLM(str(d), adapters={"good": str(good)}, device="cpu", max_lora_rank=8)
    big = make_peft_adapter(hf, tmp_path / "big", seed=2, r=16)
    with pytest.raises(AdapterLoadError, match="16"):
        llm.load_adapter("big", str(big))
    with pytest.raises(AdapterLoadError):
        llm.load_adapter("missing", str(tmp_path / "nope"))
    lb = make_peft_adapter(hf, tmp_path / "lora_bias", seed=3, r=4, lora_bias=True)
    with pytest.raises(AdapterLoadError, match="lora_bias"):
        llm.load_adapter("lora_bias", str(lb))
    assert llm.list_adapters() == ["good"]
    out = llm.generate([[1, 5, 6]], SamplingParams(max_tokens=4), adapters="good")[0]
    assert len(out.token_ids) == 4
    with pytest.raises(AdapterNotFoundError, match="big"):
        llm.generate([[1, 5]], SamplingParams(max_tokens=2), adapters="big")


def test_lora_metadata_and_scratch_are_reused_across_steps(tmp_path):
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    dirs = {n: make_peft_adapter(hf, tmp_path / n, seed=i, r=4) for i, n in enumerate("ab")}
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu")
    lora = llm.engine.lora_batches
    seen = []
    prepare = lora.prepare

    def spy(slots, lengths, **kw):
        b = prepare(slots, lengths, **kw)
        seen.append((b, b.seg_starts.data_ptr(), b.seg_lora_slots.data_ptr(),
                     b.token_lora_slots.data_ptr(), llm.engine.lora_layers[0].scratch.data_ptr()))
        return b

    lora.prepare = spy
    llm.generate([[1, 4, 5], [1, 9], [1, 3, 3, 3]], SamplingParams(max_tokens=5),
                 adapters=["a", "b", None])
    assert len(seen) == 5  # one prefill + four decode steps
    assert len({tuple(map(id, [s[0]])) + s[1:] for s in seen}) == 1
    assert len({w.scratch.data_ptr() for w in llm.engine.lora_layers}) == 1
    # a base-only batch skips the LoRA path: prepare() is not called
    llm.generate([[1, 4]], SamplingParams(max_tokens=3))
    assert len(seen) == 5


def test_static_buffer_decode_with_adapters_matches_eager(tmp_path):
    """Decode through the CUDA-graph buffers (run eagerly on CPU): adapters switch through
    the static ``token_lora_slots`` and padding rows (slot -1) leave real rows alone."""
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    dirs = {n: str(make_peft_adapter(hf, tmp_path / n, seed=i, r=4 + i))
            for i, n in enumerate("abc")}
    sp = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    names = ["a", "b", None, "c", "a"]
    prompts = [[1, 5 + i, 9, 30 + i] for i in range(5)]
    eager = LLM(str(d), adapters=dirs, device="cpu", max_num_seqs=8)
    static = LLM(str(d), adapters=dirs, device="cpu", max_num_seqs=8, cuda_graphs=True)
    want = [o.token_ids for o in eager.generate(prompts, sp, adapters=names)]
    assert [o.token_ids for o in static.generate(prompts, sp, adapters=names)] == want
    assert static.engine.lora_batches.batch.is_decode
