"""The engine on CUDA: Triton LoRA backend and CUDA-graph decode against the eager and
reference paths, and against transformers + PEFT. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from helpers_lora import make_peft_adapter, make_tiny_model, peft_reference

from loraplex import LLM, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu")
    d, hf = make_tiny_model(tmp / "base", "llama")
    dirs = {f"a{i}": str(make_peft_adapter(hf, tmp / f"a{i}", seed=i, r=4 * (i + 1),
                                           b_scale=0.5)) for i in range(4)}
    return d, hf, dirs


def _prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [[1] + torch.randint(4, 120, (int(k),), generator=g).tolist()
            for k in torch.randint(3, 40, (n,), generator=g)]


def test_graphs_equal_eager_and_reference_backend(setup):
    d, _, dirs = setup
    names = ["a0", "a1", None, "a2", "a3", "a0", None, "a1", "a2"]
    prompts = _prompts(len(names))
    sp = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    # three engines at once: each may take a quarter of the GPU (the default 0.9 is per engine)
    kw = dict(adapters=dirs, device="cuda", dtype="float32", max_num_seqs=16,
              gpu_memory_utilization=0.25)
    graphs = LLM(str(d), lora_backend="triton", **kw)
    assert graphs.engine.runner.graphs is not None and graphs.engine.runner.graphs.capture
    eager = LLM(str(d), lora_backend="triton", cuda_graphs=False, **kw)
    ref = LLM(str(d), lora_backend="torch", cuda_graphs=False, **kw)
    out_g = [o.token_ids for o in graphs.generate(prompts, sp, adapters=names)]
    out_e = [o.token_ids for o in eager.generate(prompts, sp, adapters=names)]
    assert out_g == out_e
    # float32: the kernels' fp32 dots are forced to IEEE (lora_triton._precision; the decode
    # kernels multiply and reduce on CUDA cores), so only the summation order differs from
    # the torch backend. 1e-4 of the largest logit is ~1000x float32 rounding over this
    # model, and far below what a wrong scaling or a missed slice would move.
    for a, b in zip(graphs.score(prompts, names), ref.score(prompts, names), strict=True):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()


def test_bf16_scores_match_peft(setup):
    d, hf, dirs = setup
    llm = LLM(str(d), adapters=dirs, device="cuda", dtype="bfloat16")
    names = ["a0", "a3", None]
    prompts = _prompts(3)
    for ids, name, got in zip(prompts, names, llm.score(prompts, names), strict=True):
        model = hf if name is None else peft_reference(hf, dirs[name])
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0]
        rel = (got - want).norm() / want.norm()
        assert rel < 3e-2, (name, rel.item())


def test_switching_adapters_never_recaptures(setup):
    d, _, dirs = setup
    llm = LLM(str(d), adapters=dirs, device="cuda", dtype="bfloat16", max_num_seqs=8)
    graphs = dict(llm.engine.runner.graphs.graphs)
    sp = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    for mix in (["a0", "a1"], ["a2", "a3"], ["a3", None], [None, None]):
        outs = llm.generate(_prompts(2), sp, adapters=mix)
        assert all(len(o.token_ids) == 6 for o in outs)
    assert llm.engine.runner.graphs.graphs == graphs


def test_captured_decode_step_allocates_nothing(setup):
    d, _, dirs = setup
    llm = LLM(str(d), adapters=dirs, device="cuda", dtype="bfloat16", max_num_seqs=8)
    engine = llm.engine
    sp = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    for i, a in enumerate(["a0", "a1", None, "a3", "a0"]):
        engine.add_request(f"r{i}", _prompts(5)[i], sp, a)
    engine.step()  # prefill
    engine.step()
    seqs = list(engine.scheduler.running)
    for s in seqs:  # grow each sequence by one slot, as the scheduler would
        engine.blocks.append(s.seq_id, s.num_tokens)
    slots = [engine.runner._lora_slot(s) for s in seqs]
    order = sorted(range(len(seqs)), key=lambda i: slots[i])
    seqs, slots = [seqs[i] for i in order], [slots[i] for i in order]
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    for _ in range(3):
        engine.runner._decode(seqs, slots)
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before
