"""Engine core against Hugging Face transformers: logits, greedy generation, batching,
preemption, sampling and stop conditions, and the errors a user can cause."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_lora import load_hf_model, make_tiny_model

from loraplex import LLM, InvalidRequestError, ModelLoadError, SamplingParams

PROMPTS = ["hello world", "the quick brown fox jumps", "a", "int main() { return 0; }",
           "to be or not to be, that is", "zz"]


def _randomize_biases(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d, hf = make_tiny_model(tmp_path_factory.mktemp("llama"), "llama")
    return d, hf, LLM(str(d), device="cpu", max_num_seqs=16)


def _check_logits(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err


@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}),
    ("mistral", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
])
def test_score_matches_transformers(tmp_path, arch, overrides):
    d, hf = make_tiny_model(tmp_path / arch, arch, **overrides)
    if arch == "qwen2":  # HF initialises biases to zero: make them matter
        _randomize_biases(hf)
        hf.save_pretrained(d)
        hf = load_hf_model(d)
    llm = LLM(str(d), device="cpu")
    g = torch.Generator().manual_seed(1)
    # 33, 31 and 30 share one right-padded attention call; 1, 7 and 100 run alone
    lengths = (1, 33, 7, 31, 100, 30)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]
    for ids, ours in zip(prompts, llm.score(prompts), strict=True):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        _check_logits(ours, ref)


def test_sharded_checkpoint(tmp_path):
    d, hf = make_tiny_model(tmp_path / "m", "llama")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    for f in d.glob("tokenizer*"):
        (tmp_path / "sharded" / f.name).write_bytes(f.read_bytes())
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids = [[1, 5, 9, 13, 2, 40]]
    ours = LLM(str(tmp_path / "sharded"), device="cpu").score(ids)[0]
    _check_logits(ours, hf(torch.tensor(ids)).logits[0].detach())


def test_greedy_batch_matches_hf_generate_alone(llama):
    d, hf, llm = llama
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0))
    for prompt, out in zip(PROMPTS, outs, strict=True):
        ids = llm.tokenizer.encode(prompt)
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)[0, len(ids):]
        assert out.token_ids == ref.tolist()
        assert out.finish_reason == ("stop" if ref[-1].item() == 2 else "length")


def test_greedy_alone_equals_in_crowd_and_under_preemption(tmp_path, llama):
    d, _, llm = llama
    g = torch.Generator().manual_seed(3)
    crowd = [torch.randint(4, 100, (int(n),), generator=g).tolist()
             for n in torch.randint(3, 40, (16,), generator=g)]
    sp = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    alone = [llm.generate([p], sp)[0].token_ids for p in crowd[:3]]
    together = llm.generate(crowd, sp)
    assert [o.token_ids for o in together[:3]] == alone
    tiny = LLM(str(d), device="cpu", max_num_seqs=16, num_kv_blocks=12)
    squeezed = tiny.generate(crowd, sp)
    assert tiny.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in together]
    assert tiny.engine.blocks.num_free == tiny.engine.blocks.num_blocks


def test_seeded_sampling_is_reproducible_regardless_of_batch(llama):
    _, _, llm = llama
    sp = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=1234,
                        ignore_eos=True)
    a = llm.generate(["hello world"], sp)[0].token_ids
    mates = [SamplingParams(max_tokens=20, temperature=1.0, seed=i) for i in range(5)]
    b = llm.generate(["the cat", "hello world", "x", "y", "z", "w"], [mates[0], sp] + mates[1:])
    assert b[1].token_ids == a
    other = llm.generate(["hello world"], SamplingParams(max_tokens=20, temperature=0.9,
                                                         seed=99, ignore_eos=True))[0]
    assert other.token_ids != a  # a different seed really samples differently


def test_top_k_1_is_greedy(llama):
    _, _, llm = llama
    greedy = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=12, temperature=0))
    topk = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=12, temperature=1.5, top_k=1))
    assert [o.token_ids for o in greedy] == [o.token_ids for o in topk]


def test_stop_strings_eos_and_stop_token_ids(llama):
    _, _, llm = llama
    full = llm.generate(["hello world"], SamplingParams(max_tokens=24, temperature=0,
                                                        ignore_eos=True))[0]
    assert len(full.token_ids) == 24 and full.finish_reason == "length"
    stop = full.text[5:8]
    cut = llm.generate(["hello world"], SamplingParams(max_tokens=24, temperature=0,
                                                       ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text
    tok = full.token_ids[3]
    by_id = llm.generate(["hello world"], SamplingParams(max_tokens=24, temperature=0,
                                                         stop_token_ids=[tok]))[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids[-1] == tok
    assert tok not in by_id.token_ids[:-1]
    # EOS: make EOS the model's greedy choice by declaring the first greedy token to be EOS
    llm.engine.eos_ids.add(full.token_ids[0])
    try:
        eos = llm.generate(["hello world"], SamplingParams(max_tokens=24, temperature=0))[0]
        assert eos.token_ids == full.token_ids[:1] and eos.finish_reason == "stop"
        ign = llm.generate(["hello world"], SamplingParams(max_tokens=24, temperature=0,
                                                           ignore_eos=True))[0]
        assert ign.token_ids == full.token_ids
    finally:
        llm.engine.eos_ids.discard(full.token_ids[0])


def test_bad_requests_raise_clear_errors_and_engine_keeps_serving(llama):
    _, _, llm = llama
    with pytest.raises(InvalidRequestError, match=r"300 tokens.*256"):
        llm.generate([[5] * 300], SamplingParams(max_tokens=4))
    for field, kwargs in [("temperature", {"temperature": -1}), ("top_p", {"top_p": 0}),
                          ("max_tokens", {"max_tokens": 0}), ("top_k", {"top_k": 0}),
                          ("seed", {"seed": 2**70}), ("stop", {"stop": [""]})]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**kwargs)
    with pytest.raises(InvalidRequestError, match="out of range"):
        llm.generate([[5, 999]], SamplingParams(max_tokens=2))
    ok = llm.generate(["hello"], SamplingParams(max_tokens=3, temperature=0))[0]
    assert len(ok.token_ids) == 3
    assert llm.engine.stats()["num_running"] == 0


def test_unsupported_architecture_and_missing_tensor(tmp_path):
    d, _ = make_tiny_model(tmp_path / "m", "llama")
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        LLM(str(d), device="cpu")
    (d / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        LLM(str(d), device="cpu")


def test_static_buffer_decode_path_matches_eager(llama, tmp_path):
    """The CUDA-graph decode path (static buffers, padded batch sizes, dummy KV block),
    run eagerly on CPU, gives the eager engine's tokens."""
    d, _, llm = llama
    static = LLM(str(d), device="cpu", max_num_seqs=16, cuda_graphs=True)
    assert static.engine.runner.graphs is not None
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = PROMPTS + ["x y z", "one more prompt"]
    want = [o.token_ids for o in llm.generate(prompts, sp)]
    assert [o.token_ids for o in static.generate(prompts, sp)] == want
    assert [o.token_ids for o in static.generate(prompts[:3], sp)] == want[:3]  # padded 3 -> 4


def test_static_buffers_send_only_the_real_table_width(llama):
    """The CUDA layout of the static buffers (block tables staged through a contiguous
    buffer, bs x used ids a step), forced on CPU: same tokens as eager, and table columns
    past the longest real table are never written (the cost follows the real contexts, not
    max_model_len)."""
    from loraplex.engine.cuda_graph import DecodeGraphs

    d, _, llm = llama
    static = LLM(str(d), device="cpu", max_num_seqs=8, cuda_graphs=True)
    runner = static.engine.runner
    g = runner.graphs
    runner.graphs = DecodeGraphs(g.model, g.kv_caches, g.lora, g.max_bs, g.block_tables.shape[1],
                                 g.block_size, g.dummy_block, torch.device("cpu"),
                                 capture=False, stage=True)
    tables = runner.graphs.block_tables
    longest = max(len(static.engine.tokenize(p)) for p in PROMPTS) + 12
    used = -(-longest // g.block_size)
    assert tables.shape[1] > used + 1
    tables[:, used:] = -5  # never read (past every length), so never written either
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    want = [o.token_ids for o in llm.generate(PROMPTS, sp)]
    assert [o.token_ids for o in static.generate(PROMPTS, sp)] == want
    assert bool((tables[:, used:] == -5).all())


def test_sequence_outgrowing_the_whole_cache_ends_with_length(llama):
    d, _, _ = llama
    tiny = LLM(str(d), device="cpu", num_kv_blocks=3)  # 48 tokens of KV in all
    sp = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    out = tiny.generate([[1] + [7] * 29, [1, 5, 6]], sp)
    assert out[0].finish_reason == "length" and len(out[0].token_ids) == 48 - 30 + 1
    assert out[1].finish_reason == "length" and len(out[1].token_ids) == 40
    assert tiny.engine.blocks.num_free == 3 and not tiny.engine.has_unfinished_requests()


def test_lowest_temperature_runs_and_below_it_is_refused(llama):
    _, _, llm = llama
    low = llm.generate(PROMPTS[:2], SamplingParams(max_tokens=8, temperature=0.01, seed=1,
                                                   ignore_eos=True))
    assert [len(o.token_ids) for o in low] == [8, 8] and all(o.error is None for o in low)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=1e-30)  # underflowed to 0 in the sampler and failed step()


def test_cpu_prepacked_weights_match_dense_and_free_the_dense_copy(tmp_path):
    """On CPU the linear weights are prepacked by default (oneDNN layout): same logits and
    tokens as the dense weights, the dense copies are gone, and a tied embedding survives."""
    d, hf = make_tiny_model(tmp_path / "q", "qwen2", tie_word_embeddings=True)
    packed = LLM(str(d), device="cpu")
    dense = LLM(str(d), device="cpu", cpu_prepack=False)
    from loraplex.layers.linear import LinearBase

    def linears(llm):
        return [m for m in llm.engine.runner.model.modules() if isinstance(m, LinearBase)]

    assert all(m.packed is not None and m.weight.is_meta for m in linears(packed))
    assert not any(m.packed is not None or m.weight.is_meta for m in linears(dense))
    embed = packed.engine.runner.model.model.embed_tokens.weight
    assert not embed.is_meta and torch.equal(embed, hf.model.embed_tokens.weight)
    ids = [[1, 5, 9, 13, 2, 40, 7, 7, 3]]
    _check_logits(packed.score(ids)[0], dense.score(ids)[0])
    with torch.no_grad():
        _check_logits(packed.score(ids)[0], hf(torch.tensor(ids)).logits[0])
    sp = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    assert ([o.token_ids for o in packed.generate(PROMPTS, sp)]
            == [o.token_ids for o in dense.generate(PROMPTS, sp)])
    with pytest.raises(ValueError, match="cpu_prepack"):
        LLM(str(d), device="cpu", dtype="float16", cpu_prepack=True)


def test_token_budget_below_the_context_splits_prefills_and_still_runs_long_prompts(llama):
    d, _, llm = llama
    # the classic step shapes (chunked prefill splits prompts instead: test_chunked_prefill.py)
    small = LLM(str(d), device="cpu", max_num_seqs=16, max_num_batched_tokens=16,
                enable_chunked_prefill=False, enable_prefix_caching=False)
    assert small.engine.scheduler.cfg.max_num_batched_tokens == 16 < small.engine.max_model_len
    prompts = [[1] + [9] * 40, [1, 5, 6], [1, 7, 8, 9], [1] + [11] * 20]
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert ([o.token_ids for o in small.generate(prompts, sp)]
            == [o.token_ids for o in llm.generate(prompts, sp)])
    for i, p in enumerate(prompts):
        small.engine.add_request(f"b{i}", p, sp)
    steps = [len(small.engine.step()) for _ in range(3)]
    assert steps == [1, 2, 1]  # 41 tokens alone, then 3 + 4 together, then 21 alone
    while small.engine.has_unfinished_requests():
        small.engine.step()


def test_default_token_budget_keeps_cpu_step_buffers_under_the_mmap_ceiling():
    import dataclasses

    from loraplex.config import ModelConfig, RopeConfig
    from loraplex.engine.llm_engine import default_token_budget

    base = ModelConfig("LlamaForCausalLM", 32000, 1024, 2816, 8, 16, 4, 64, 2048, 1e-5,
                       RopeConfig(), False, False, torch.float32)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # the benchmark model: a [2048, 5632] float32 gate/up output is 46 MiB, [1024, 5632] 23 MiB
    assert default_token_budget(base, cpu, torch.float32) == 1024
    assert default_token_budget(base, cpu, torch.bfloat16) == 2048
    tiny = dataclasses.replace(base, hidden_size=96, intermediate_size=160)
    assert default_token_budget(tiny, cpu, torch.float32) == 2048
    big = dataclasses.replace(base, hidden_size=4096, intermediate_size=14336)
    assert default_token_budget(big, cpu, torch.float32) == 512  # the floor
    assert default_token_budget(big, cuda, torch.bfloat16) == 8192
