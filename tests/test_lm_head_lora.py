"""lm_head LoRA and the plumbing it needs: every ``compute_logits`` call runs under a LoRA
batch that segments exactly the rows it is given (decode, graphs, mixed steps, score,
prompt logprobs)."""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch
from helpers_lora import make_peft_adapter, make_tiny_model
from torch import nn

from loraplex import LLM, SamplingParams
from loraplex.layers.forward_context import get_forward_batch
from loraplex.ops.lora_ops import get_lora_ops

# Without CUDA the Triton kernels run in Triton's interpreter, whose flag is read when triton
# is imported and when the kernels are defined (as in test_lora_triton.py); restored after.
lora_triton = None
if importlib.util.find_spec("triton") is not None:
    _SAVED_FLAG = os.environ.get("TRITON_INTERPRET")
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction

    from loraplex.ops import lora_triton, lora_triton_kernels

    if not torch.cuda.is_available() and not isinstance(lora_triton_kernels.shrink_decode_kernel,
                                                        InterpretedFunction):
        importlib.reload(lora_triton_kernels)  # imported earlier without the flag
    if _SAVED_FLAG is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _SAVED_FLAG

FORCED = 10  # a row on lora slot s gets logit +1000 on token FORCED + s


class SlotForcingHead(nn.Module):
    """Stands in for a per-slot lm_head: it reads the LoRA batch the way a wrapper does (the
    torch backend's host segments) and forces token ``FORCED + slot`` on each segment's rows.
    A row given another row's slot produces the wrong token."""

    reads_lora_batch = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base, self.calls = base, []

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        y = self.base(hidden)
        lora = get_forward_batch().lora
        segs = [] if lora is None else lora.host_segs
        self.calls.append((hidden.shape[0], segs and list(segs)))
        covered = sum(n for _, n, _ in segs)
        assert covered <= hidden.shape[0] and (lora is None or lora.num_tokens <= y.shape[0])
        for start, n, slot in segs:
            y[start : start + n, FORCED + slot] += 1000.0
        return y


def _engine(tmp_path, **kw) -> tuple[LLM, SlotForcingHead]:
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    dirs = {name: make_peft_adapter(hf, tmp_path / name, seed=i, r=4, b_scale=0.2)
            for i, name in enumerate(("a", "b", "c"))}
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_loras_per_batch=3, max_lora_rank=8, **kw)
    model = llm.engine.runner.model
    model.lm_head = SlotForcingHead(model.lm_head)
    return llm, model.lm_head


def _slot(llm: LLM, name: str) -> int:
    return llm.engine.lora_pool.lora_slot_of(llm.engine.adapters.get(name).key)


@pytest.mark.parametrize("graphs", [False, True])
def test_logits_see_their_own_rows_lora_slots(tmp_path, graphs):
    # 5-token budget: prompt chunks and decodes share steps (mixed steps whose sampled rows
    # are a few of the forward's rows); prefix caching on; graphs=True: the static-buffer
    # decode path (the one CUDA captures), eagerly on CPU
    llm, head = _engine(tmp_path, max_num_batched_tokens=5, enable_prefix_caching=True,
                        cuda_graphs=graphs, max_num_seqs=8)
    names = [None, "a", "b", None, "c", "a", None, "b"]
    g = torch.Generator().manual_seed(0)
    prompts = [[1] + torch.randint(4, 100, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 12, (len(names),), generator=g)]
    params = [SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                             prompt_logprobs=1 if i % 3 == 0 else None, logprobs=1)
              for i in range(len(names))]
    base_rows = [i for i, n in enumerate(names) if n is None]
    solo = {i: llm.generate([prompts[i]], params[i])[0] for i in base_rows}
    solo_scores = {i: llm.score([prompts[i]])[0] for i in base_rows}
    outs = llm.generate(prompts, params, adapters=names)
    scores = llm.score(prompts, adapters=names)
    assert any(n > 1 and segs and len(segs) > 1 for n, segs in head.calls)
    for i, (name, out, logits) in enumerate(zip(names, outs, scores, strict=True)):
        if name is None:  # base rows: exactly the tokens and logprobs they get alone
            assert out.token_ids == solo[i].token_ids, i
            torch.testing.assert_close(logits, solo_scores[i], rtol=1e-5, atol=1e-5)
            assert [e.token_id for e in out.logprobs] == out.token_ids
            if out.prompt_logprobs is not None:
                assert ([None if e is None else e.top[0][0] for e in out.prompt_logprobs]
                        == [None if e is None else e.top[0][0]
                            for e in solo[i].prompt_logprobs]), i
            continue
        want = FORCED + _slot(llm, name)
        assert out.token_ids == [want] * 6, (i, name)
        assert logits.argmax(-1).tolist() == [want] * len(prompts[i]), (i, name)
        if out.prompt_logprobs is not None:
            assert [e.top[0][0] for e in out.prompt_logprobs[1:]] == [want] * (
                len(prompts[i]) - 1), (i, name)


@pytest.mark.parametrize("reader", [False, True])
def test_logits_lora_batch_only_for_a_reader(tmp_path, monkeypatch, reader):
    llm, _ = _engine(tmp_path, max_num_batched_tokens=5)
    model, runner = llm.engine.runner.model, llm.engine.runner
    model.lm_head = model.lm_head.base  # a plain lm_head: nothing reads the rows' batch
    if reader:
        model.lm_head = SlotForcingHead(model.lm_head)
    forwards, batches = [], []
    model.register_forward_hook(lambda *_: forwards.append(1))
    build = runner._lora_batch
    monkeypatch.setattr(runner, "_lora_batch", lambda *a, **k: batches.append(1) or build(*a, **k))
    llm.generate([[1, 5, 6, 7, 8, 9, 10]] * 2, SamplingParams(max_tokens=3, ignore_eos=True),
                 adapters=["a", None])
    # one LoRA batch per forward; the logits' rows get their own only when lm_head reads it
    assert (len(batches) > len(forwards)) if reader else (len(batches) == len(forwards))


def test_profiled_step_logits_under_their_rows_batch(tmp_path):
    from loraplex.kvcache.profile import largest_step

    llm, head = _engine(tmp_path, max_num_batched_tokens=40, max_model_len=16, max_num_seqs=5)
    engine = llm.engine
    head.calls.clear()
    largest_step(engine.runner.model, engine.scheduler.cfg, engine.lora_batches, 3,
                 engine.device)()
    # 40 tokens as 16 + 16 + 8 on slots 0, 1, 2: last tokens, then 5 decode rows
    assert head.calls == [(3, [(0, 1, 0), (1, 1, 1), (2, 1, 2)]),
                          (5, [(0, 2, 0), (2, 2, 1), (4, 1, 2)])]


# -- lm_head LoRA against PEFT --------------------------------------------------------------
ADAPTERS = {  # name -> make_peft_adapter kwargs
    "head_only": dict(r=8, lora_alpha=16, target_modules=["lm_head"]),
    "head_qv": dict(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj", "v_proj"]),
    "head_emb_rs": dict(r=16, lora_alpha=8, use_rslora=True, rank_pattern={"lm_head": 2},
                        target_modules=["lm_head", "embed_tokens", "down_proj"]),
    "plain": dict(r=8, lora_alpha=16),
    "emb": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "o_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "up_proj"]),
}


def _peft_case(tmp_path, arch):
    overrides = {"tie_word_embeddings": True} if arch == "qwen2" else {}
    d, hf = make_tiny_model(tmp_path / "base", arch, **overrides)
    dirs = {name: make_peft_adapter(hf, tmp_path / name, seed=i, b_scale=0.5, **kw)
            for i, (name, kw) in enumerate(ADAPTERS.items())}
    return d, dirs


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: tied lm_head
def test_lm_head_lora_mixed_batch_equals_peft(tmp_path, arch):
    from helpers_lora import load_hf_model, peft_reference

    d, dirs = _peft_case(tmp_path, arch)
    # 7-token steps: chunked prefill mixes prompt chunks with decodes; prefix caching on
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_loras_per_batch=len(dirs), max_lora_rank=16, enable_lm_head_lora=True,
              max_num_batched_tokens=7, enable_prefix_caching=True)
    names = [*dirs, None, "head_only", None, "head_emb_rs"]
    g = torch.Generator().manual_seed(3)
    prompts = [[1] + torch.randint(4, 120, (int(n),), generator=g).tolist()
               for n in torch.randint(2, 20, (len(names),), generator=g)]
    new = 8
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True, logprobs=2,
                            prompt_logprobs=1)
    scores = llm.score(prompts, adapters=names)
    gens = llm.generate(prompts, params, adapters=names)
    again = llm.generate(prompts, params, adapters=names)  # from the prefix cache this time
    base = load_hf_model(d)
    for ids, name, logits, gen, gen2 in zip(prompts, names, scores, gens, again, strict=True):
        ref_model = base if name is None else peft_reference(d, dirs[name])
        x = torch.tensor([ids])
        with torch.no_grad():
            ref_tokens = ref_model.generate(input_ids=x, max_new_tokens=new, do_sample=False,
                                            eos_token_id=None, min_new_tokens=new)[0]
            ref_all = ref_model(input_ids=ref_tokens[None]).logits[0]  # prompt + generated
            base_logits = base(input_ids=x).logits[0]
        ref_logits = ref_all[: len(ids)]
        scale = ref_logits.abs().max().item()
        assert (logits - ref_logits).abs().max().item() <= 1e-4 * scale, name
        assert gen.token_ids == ref_tokens[len(ids):].tolist() == gen2.token_ids, name
        lp = torch.log_softmax(ref_all.double(), -1)
        want = [lp[len(ids) - 1 + j, t].item() for j, t in enumerate(gen.token_ids)]
        got = [e.logprob for e in gen.logprobs]
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4 * scale, name
        want_p = [lp[p - 1, ids[p]].item() for p in range(1, len(ids))]
        got_p = [e.logprob for e in gen.prompt_logprobs[1:]]
        assert max(abs(a - b) for a, b in zip(got_p, want_p)) <= 1e-4 * scale, name
        if name is not None:  # the adapter really changes the model
            assert (ref_logits - base_logits).abs().max() > 1e-3, name


def test_lm_head_refused_without_the_flag(tmp_path):
    from loraplex import AdapterLoadError

    d, hf = make_tiny_model(tmp_path / "base", "llama")
    head = make_peft_adapter(hf, tmp_path / "head", r=4, target_modules=["q_proj", "lm_head"])
    plain = make_peft_adapter(hf, tmp_path / "plain", r=4)
    llm = LLM(str(d), adapters={"plain": str(plain)}, device="cpu", max_lora_rank=8)
    assert llm.engine.lora_pool.buffers.lm_head is None  # nothing allocated when off
    with pytest.raises(AdapterLoadError, match=r"adapter 'head': adapter_config.json: "
                       r"target_modules=\['lm_head', 'q_proj'\] targets lm_head; serving lm_head "
                       r"LoRA needs enable_lm_head_lora=True \(--enable-lm-head-lora\)"):
        llm.load_adapter("head", str(head))
    assert llm.list_adapters() == ["plain"]


def test_server_completions_on_lm_head_adapter_and_base_equal_peft(tmp_path):
    import openai
    from helpers_lora import load_hf_model, peft_reference
    from server_utils import CLIENT_TIMEOUT, InProcessServer

    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.server.api import ServerConfig, create_app

    d, hf = make_tiny_model(tmp_path / "base", "llama")
    dirs = {"head": make_peft_adapter(hf, tmp_path / "head", seed=1, r=8,
                                      target_modules=["lm_head", "v_proj"]),
            "plain": make_peft_adapter(hf, tmp_path / "plain", seed=2, r=4, b_scale=0.5)}
    adapters = {k: str(v) for k, v in dirs.items()}
    engine = LLMEngine.from_args(str(d), adapters=adapters, device="cpu", num_kv_blocks=64,
                                 max_lora_rank=8, enable_lm_head_lora=True,
                                 max_num_batched_tokens=6, enable_prefix_caching=True)
    srv = InProcessServer(create_app(engine, ServerConfig("tiny", str(d), adapters)))
    prompt = [1, 40, 41, 72, 73, 74, 80, 81, 90]
    new = 10
    try:
        c = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0,
                          timeout=CLIENT_TIMEOUT)
        texts = {}
        for model, ref in (("head", peft_reference(d, dirs["head"])),
                           ("tiny", load_hf_model(d))):
            got = c.completions.create(model=model, prompt=prompt, max_tokens=new,
                                       temperature=0, extra_body={"ignore_eos": True})
            with torch.no_grad():
                ids = ref.generate(input_ids=torch.tensor([prompt]), max_new_tokens=new,
                                   do_sample=False, eos_token_id=None, min_new_tokens=new)
            want = engine.tokenizer.decode(ids[0, len(prompt):], skip_special_tokens=True)
            assert got.choices[0].text == want, model
            texts[model] = want
        assert texts["head"] != texts["tiny"]
    finally:
        srv.stop()


def test_cli_flag(tmp_path, capsys):
    import argparse

    from loraplex.cli import main as cli_main
    from loraplex.server.api import add_serve_args

    d, hf = make_tiny_model(tmp_path / "base", "llama")
    head = make_peft_adapter(hf, tmp_path / "head", r=4, target_modules=["lm_head"])
    args = ["generate", "--model", str(d), "--adapter", f"head={head}", "--device", "cpu",
            "--max-lora-rank", "8", "--kv-cache-memory", "1MiB", "--prompt", "the",
            "--use-adapter", "head", "--max-tokens", "2"]
    assert cli_main(args) == 2
    assert "needs enable_lm_head_lora=True (--enable-lm-head-lora)" in capsys.readouterr().err
    assert cli_main([*args, "--enable-lm-head-lora"]) == 0
    serve = add_serve_args(argparse.ArgumentParser())
    assert serve.parse_args(["--model", "m", "--enable-lm-head-lora"]).enable_lm_head_lora
    assert not serve.parse_args(["--model", "m"]).enable_lm_head_lora


def test_serve_ray_flag_reaches_the_replicas_engine_args(tmp_path, monkeypatch):
    """``loraplex serve-ray --enable-lm-head-lora`` puts the flag into every replica's engine
    arguments (Ray itself is not needed: the command's entry point is replaced)."""
    import sys
    import types

    from loraplex.cli import main as cli_main
    from loraplex.serve_ray.config import config_from_args

    seen = []
    fake = types.ModuleType("loraplex.serve_ray.app")
    fake.run_serve_ray = seen.append
    monkeypatch.setitem(sys.modules, "loraplex.serve_ray.app", fake)
    (tmp_path / "m").mkdir()
    for extra in ([], ["--enable-lm-head-lora"]):
        assert cli_main(["serve-ray", "--model", str(tmp_path / "m"), *extra]) == 0
        assert config_from_args(seen[-1]).engine_args["enable_lm_head_lora"] is bool(extra)


# -- the wrapper on both op backends, vocabulary-wide N -----------------------------------
def _triton_ops(monkeypatch):
    """The Triton ops: compiled on a GPU, else run by Triton's interpreter (set up at import,
    above, as test_lora_triton.py does)."""
    if lora_triton is None:
        pytest.skip("needs triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        # interpreted grids cost ~ms per program: size them as for a small GPU
        monkeypatch.setattr(lora_triton, "_num_sms", lambda device: 4)
    return get_lora_ops("triton")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("decode", [False, True])
def test_lm_head_wrapper_equals_float64_reference(monkeypatch, backend, dtype, decode):
    from helpers_lora import tiny_hf_config

    from loraplex.config import ModelConfig
    from loraplex.layers.forward_context import ForwardBatch, forward_context
    from loraplex.layers.linear import ColumnLinear
    from loraplex.lora.adapter import EMBED_LAYER, LM_HEAD, LoRAAdapter, LoRAWeights
    from loraplex.lora.buffers import LoRABuffers
    from loraplex.lora.layers import LoRALMHead
    from loraplex.ops.lora_meta import LoRABatch

    if dtype == torch.float16 and backend == "torch" and not torch.cuda.is_available():
        pytest.skip("CPU half GEMMs: the engine serves bfloat16/float32 on CPU")
    ops = _triton_ops(monkeypatch) if backend == "triton" else get_lora_ops("torch")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    vocab, hidden, max_rank = 1000, 96, 16  # 1000: no multiple of any column tile
    cfg = ModelConfig.from_hf(tiny_hf_config("llama", vocab_size=vocab))
    bufs = LoRABuffers(cfg, 4, max_rank, dtype, torch.device(dev), lm_head=True)
    g = torch.Generator().manual_seed(7)
    adapters = {}  # slot -> (A, B, scaling) in float64; slot 2 holds an adapter without lm_head
    for slot, r in ((0, 16), (1, 3), (3, 8)):
        a = torch.randn(r, hidden, generator=g).to(dtype)
        b = (torch.randn(vocab, r, generator=g) * 0.3).to(dtype)
        adapters[slot] = (a.double(), b.double(), 2.0 / r)
        bufs.write(slot, LoRAAdapter(f"s{slot}", "", {
            (EMBED_LAYER, LM_HEAD): LoRAWeights(a, b, 2.0 / r)}))
    bufs.write(2, LoRAAdapter("s2", "", {}))
    base = ColumnLinear(hidden, vocab).to(dev)
    base.weight.data = (torch.randn(vocab, hidden, generator=g) * 0.1).to(dtype).to(dev)
    scratch = torch.zeros(64, max_rank, dtype=dtype, device=dev)
    head = LoRALMHead(base, bufs.lm_head, scratch, ops, bufs.lm_head_slots)
    assert head.reads_lora_batch and bufs.lm_head_slots == {0, 1, 3}
    token_slots = ([0, 1, 2, -1, 3, 0, 3, 1] if decode
                   else [0] * 9 + [1] * 6 + [-1] * 3 + [2] * 4 + [3] * 7)
    batch = LoRABatch.from_token_slots(token_slots, dev)
    batch.is_decode = decode
    x = torch.randn(len(token_slots), hidden, generator=g).to(dtype)
    with forward_context(ForwardBatch(is_prefill=False, num_tokens=len(token_slots),
                                      slot_mapping=None, lora=batch)):
        got = head(x.to(dev)).cpu().double()
    want = x.double() @ base.weight.detach().cpu().double().T
    for row, slot in enumerate(token_slots):
        if slot in adapters:
            a, b, s = adapters[slot]
            want[row] += s * (x[row].double() @ a.T) @ b.T
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * want.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphs_with_lm_head_lora_equal_peft(tmp_path):
    """CUDA graphs capture the decode logits with the LoRA batch (the Triton expand over the
    vocabulary inside the graph); tokens equal eager and PEFT, scores PEFT's."""
    from helpers_lora import peft_reference

    d, dirs = _peft_case(tmp_path, "llama")
    kw = dict(adapters={k: str(v) for k, v in dirs.items()}, device="cuda", dtype="float32",
              max_loras_per_batch=len(dirs), max_lora_rank=16, enable_lm_head_lora=True,
              max_num_seqs=8, gpu_memory_utilization=0.3, lora_backend="triton")
    graphs = LLM(str(d), **kw)
    assert graphs.engine.runner.graphs is not None and graphs.engine.runner.graphs.capture
    eager = LLM(str(d), cuda_graphs=False, **kw)
    names = ["head_only", None, "head_qv", "plain", "head_emb_rs", "dora"]
    g = torch.Generator().manual_seed(1)
    prompts = [[1] + torch.randint(4, 120, (int(n),), generator=g).tolist()
               for n in torch.randint(3, 30, (len(names),), generator=g)]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    out_g = [o.token_ids for o in graphs.generate(prompts, sp, adapters=names)]
    assert out_g == [o.token_ids for o in eager.generate(prompts, sp, adapters=names)]
    for ids, name, got, toks in zip(prompts, names, graphs.score(prompts, names), out_g,
                                    strict=True):
        if name is None:
            continue
        ref = peft_reference(d, dirs[name]).cuda()
        with torch.no_grad():
            x = torch.tensor([ids], device="cuda")
            want = ref(input_ids=x).logits[0].cpu()
            gen = ref.generate(input_ids=x, max_new_tokens=12, do_sample=False,
                               eos_token_id=None, min_new_tokens=12)[0, len(ids):]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), name
        assert toks == gen.tolist(), name


def test_logits_batch_only_while_an_lm_head_lora_is_in_a_slot(tmp_path):
    from loraplex.lora.layers import logits_read_lora

    d, hf = make_tiny_model(tmp_path / "base", "llama")
    head = make_peft_adapter(hf, tmp_path / "head", r=4, target_modules=["lm_head"])
    plain = make_peft_adapter(hf, tmp_path / "plain", r=4)
    llm = LLM(str(d), adapters={"plain": str(plain), "head": str(head)}, device="cpu",
              max_lora_rank=8, max_loras_per_batch=1, enable_lm_head_lora=True)
    model, sp = llm.engine.runner.model, SamplingParams(max_tokens=2)
    llm.generate([[1, 5, 6]], sp, adapters="plain")
    assert not logits_read_lora(model)  # the flag alone costs no per-step work
    llm.generate([[1, 5, 6]], sp, adapters="head")
    assert logits_read_lora(model)
    llm.generate([[1, 5, 6]], sp, adapters="plain")  # evicts head from the only slot
    assert not logits_read_lora(model)


def test_gemma2_lm_head_lora_before_final_softcap_equals_peft(tmp_path):
    """Gemma 2 (tied lm_head, final logit soft-capping): the delta joins the logits before
    the cap, as in PEFT, whose LoRA wraps lm_head itself."""
    import transformers as tf
    from helpers_lora import TINY_SHAPE, make_tokenizer, peft_reference

    torch.manual_seed(0)
    cfg = tf.Gemma2Config(**TINY_SHAPE, head_dim=16, query_pre_attn_scalar=16,
                          final_logit_softcapping=2.5, attn_logit_softcapping=4.0)
    hf = tf.AutoModelForCausalLM.from_config(cfg).eval()
    d = tmp_path / "gemma2"
    hf.save_pretrained(d)
    make_tokenizer(d)
    head = make_peft_adapter(hf, tmp_path / "head", seed=4, r=8, b_scale=2.0,
                             target_modules=["lm_head", "q_proj"])
    llm = LLM(str(d), adapters={"head": str(head)}, device="cpu", max_lora_rank=8,
              enable_lm_head_lora=True)
    prompts, names = [[2, 40, 41, 50, 60, 7], [2, 9, 8]], ["head", None]
    ref = peft_reference(hf, head)
    for ids, name, got in zip(prompts, names, llm.score(prompts, adapters=names), strict=True):
        model = ref if name else hf
        with torch.no_grad():
            want = model(input_ids=torch.tensor([ids])).logits[0]
        assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    with torch.no_grad():
        base = hf(input_ids=torch.tensor([prompts[0]])).logits[0]
        adapted = ref(input_ids=torch.tensor([prompts[0]])).logits[0]
    assert (adapted - base).abs().max() > 1e-2 and adapted.abs().max() <= 2.5
