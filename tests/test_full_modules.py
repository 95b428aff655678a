"""PEFT ``modules_to_save`` (a full embedding / lm_head copy) and ``trainable_token_indices``
(some rows replaced) served per slot in mixed batches with plain LoRA adapters and base
requests: logits and greedy tokens equal PEFT's, through ``LLM`` and the server. The
full-module slot budget: more such adapters than slots queue and finish, 0 refuses them at
load, an unload frees the slot."""

from __future__ import annotations

import copy
from pathlib import Path

import openai
import pytest
import torch
from helpers_lora import ALL_PROJS, edit_adapter_config, load_hf_model, make_tiny_model
from server_utils import CLIENT_TIMEOUT, InProcessServer

from loraplex import LLM, AdapterLoadError, SamplingParams
from loraplex.lora.base_weights import CheckpointWeights
from loraplex.lora.buffers import LoRABuffers
from loraplex.lora.full_module_layers import FullModuleBuffers
from loraplex.lora.peft_loader import load_peft_adapter
from loraplex.lora.pool import LoRASlotPool
from loraplex.models.loader import load_model_config

TOKENS = [5, 9, 17, 40, 77]  # trainable token ids; prompts below use them
HEAD_TOKENS = [9, 30, 64, 100]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


def make_adapter(hf, out: Path, seed: int, **kw) -> Path:
    """A saved PEFT adapter whose LoRA, full copies and trainable rows are all trained
    (random), so each changes the model's outputs."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, lora_dropout=0.0, **kw)
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(hf), cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.mul_(0.5)
            elif "modules_to_save" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn_like(p) * hf.model.embed_tokens.weight.std())
    model.save_pretrained(str(out))
    return out


def peft_model(base, adapter_dir: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base), str(adapter_dir)).eval()


ADAPTERS = {  # name -> LoraConfig kwargs
    "emb": dict(target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens"]),
    # PEFT puts no LoRA on a module it saves whole: the copy alone, no embedding LoRA
    "emb_not_lora": dict(target_modules=["embed_tokens", "q_proj"],
                         modules_to_save=["embed_tokens"]),
    "head": dict(target_modules=["o_proj"], modules_to_save=["lm_head"]),
    "both": dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
    "tokens": dict(target_modules=["q_proj", "down_proj"], trainable_token_indices=TOKENS),
    "plain": dict(target_modules=list(ALL_PROJS)),
}
TIED_ONLY = {  # PEFT ties the lm_head to the embedding's copy
    "emb_tied": dict(target_modules=["k_proj"], modules_to_save=["embed_tokens"],
                     ensure_weight_tying=True),
}
UNTIED_ONLY = {  # the lm_head's own trainable tokens
    "tokens_head": dict(target_modules=["q_proj"], trainable_token_indices={
        "embed_tokens": TOKENS, "lm_head": HEAD_TOKENS}),
}


@pytest.fixture(scope="module", params=["llama", "qwen2-tied"])
def setup(request, tmp_path_factory):
    tied = request.param.endswith("tied")
    root = tmp_path_factory.mktemp(request.param)
    arch = request.param.split("-")[0]
    d, hf = make_tiny_model(root / "base", arch, tie_word_embeddings=tied)
    specs = ADAPTERS | (TIED_ONLY if tied else UNTIED_ONLY)
    dirs = {name: make_adapter(hf, root / name, seed=i, **kw)
            for i, (name, kw) in enumerate(specs.items())}
    return d, hf, dirs


def _prompts(n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for length in torch.randint(3, 20, (n,), generator=g).tolist():
        ids = torch.randint(4, 120, (length,), generator=g).tolist()
        ids[:: 3] = [TOKENS[i % len(TOKENS)] for i in range(len(ids[:: 3]))]
        out.append([1] + ids)
    return out


def test_mixed_batch_equals_peft(setup):
    d, hf, dirs = setup
    full = [n for n in dirs if n not in ("tokens", "tokens_head", "plain")]
    # 7-token steps: prompt chunks share steps with decodes; prefix caching on
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_loras_per_batch=len(dirs), max_lora_rank=8,
              max_full_module_adapters=len(full), max_num_batched_tokens=7)
    names = [*dirs, None, "emb", None, "tokens", "head", "plain"]
    prompts = _prompts(len(names), seed=3)
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=1,
                            prompt_logprobs=1)
    scores = llm.score(prompts, adapters=names)
    gens = llm.generate(prompts, params, adapters=names)
    again = llm.generate(prompts, GREEDY, adapters=names)  # from the prefix cache
    base = load_hf_model(d)
    refs = {name: peft_model(base, path) for name, path in dirs.items()} | {None: base}
    for ids, name, logits, gen, gen2 in zip(prompts, names, scores, gens, again, strict=True):
        x = torch.tensor([ids])
        with torch.no_grad():
            ref_tokens = refs[name].generate(input_ids=x, max_new_tokens=10, do_sample=False,
                                             eos_token_id=None, min_new_tokens=10)[0]
            ref_all = refs[name](input_ids=ref_tokens[None]).logits[0]  # prompt + generated
            base_logits = base(input_ids=x).logits[0]
        ref_logits = ref_all[: len(ids)]
        scale = ref_logits.abs().max().item()
        err = (logits - ref_logits).abs().max().item()
        assert err <= 1e-4 * scale, (name, err)
        assert gen.token_ids == ref_tokens[len(ids):].tolist() == gen2.token_ids, name
        lp = torch.log_softmax(ref_all.double(), -1)  # logprobs of sampled and prompt tokens
        want = [lp[len(ids) - 1 + j, t].item() for j, t in enumerate(gen.token_ids)]
        want += [lp[p - 1, ids[p]].item() for p in range(1, len(ids))]
        got = [e.logprob for e in gen.logprobs] + [e.logprob for e in gen.prompt_logprobs[1:]]
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4 * scale, name
        if name is not None:  # the adapter really changes the model
            assert (ref_logits - base_logits).abs().max() > 1e-2, name


def test_tied_head_follows_peft(setup):
    """A tied model: a copy of embed_tokens leaves the lm_head on the base matrix (PEFT
    without ensure_weight_tying), the tied copy moves both; trainable tokens move both."""
    d, hf, dirs = setup
    if not hf.config.tie_word_embeddings:
        pytest.skip("tied model only")
    mc, base_w = load_model_config(d)[0], CheckpointWeights(d).get
    emb = load_peft_adapter(dirs["emb"], mc, 8, base_weight=base_w).replaced
    assert emb.embed is not None and emb.lm_head is None
    tied = load_peft_adapter(dirs["emb_tied"], mc, 8, base_weight=base_w).replaced
    assert tied.lm_head is tied.embed
    tokens = load_peft_adapter(dirs["tokens"], mc, 8, base_weight=base_w).replaced
    assert tokens.lm_head_rows is tokens.embed_rows and not tokens.needs_full_slot


def test_server_completion_per_adapter(setup):
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.server.api import ServerConfig, create_app

    d, _, dirs = setup
    adapters = {k: str(v) for k, v in dirs.items()}
    kw = dict(device="cpu", max_loras_per_batch=len(dirs), max_lora_rank=8,
              max_full_module_adapters=2)
    engine = LLMEngine.from_args(str(d), adapters=adapters, num_kv_blocks=128, **kw)
    srv = InProcessServer(create_app(engine, ServerConfig("tiny", str(d), adapters)))
    llm = LLM(str(d), adapters=adapters, **kw)
    prompt = "the tin hat"
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="x", max_retries=0,
                               timeout=CLIENT_TIMEOUT)
        want = llm.generate([prompt] * (len(dirs) + 1), GREEDY, adapters=[*dirs, None])
        for name, out in zip([*dirs, "tiny"], want, strict=True):
            r = client.completions.create(model=name, prompt=prompt, max_tokens=10,
                                          temperature=0, extra_body={"ignore_eos": True})
            assert r.choices[0].text == out.text, name
    finally:
        srv.stop()


def test_more_full_adapters_than_slots_queue_and_finish(tmp_path):
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    dirs = {f"e{i}": make_adapter(hf, tmp_path / f"e{i}", seed=10 + i, target_modules=["q_proj"],
                                  modules_to_save=["embed_tokens", "lm_head"][: 1 + i % 2])
            for i in range(3)}
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_loras_per_batch=2, max_lora_rank=8, max_full_module_adapters=1)
    names = [*dirs, *dirs, None]
    prompts = _prompts(len(names), seed=5)
    outs = llm.generate(prompts, GREEDY, adapters=names)
    scores = llm.score(prompts, adapters=names)  # one full adapter per group
    base = load_hf_model(d)
    for ids, name, out, logits in zip(prompts, names, outs, scores, strict=True):
        ref = base if name is None else peft_model(base, dirs[name])
        with torch.no_grad():
            want = ref.generate(input_ids=torch.tensor([ids]), max_new_tokens=10,
                                do_sample=False, eos_token_id=None, min_new_tokens=10)
            ref_logits = ref(input_ids=torch.tensor([ids])).logits[0]
        assert out.token_ids == want[0, len(ids):].tolist(), name
        err = (logits - ref_logits).abs().max().item()
        assert err <= 1e-4 * ref_logits.abs().max().item(), (name, err)
    stats = llm.engine.stats()
    assert stats["adapter_loads"] >= 3 and stats["num_pinned_slots"] == 0


def test_budget_zero_refuses_and_unload_frees_the_slot(tmp_path):
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    a = make_adapter(hf, tmp_path / "a", seed=1, target_modules=["q_proj"],
                     modules_to_save=["lm_head"])
    b = make_adapter(hf, tmp_path / "b", seed=2, target_modules=["v_proj"],
                     modules_to_save=["embed_tokens"])
    tokens = make_adapter(hf, tmp_path / "t", seed=3, target_modules=["q_proj"],
                          trainable_token_indices=TOKENS)
    with pytest.raises(AdapterLoadError, match=r"adapter 'a': modules_to_save holds a full copy "
                                               r"of lm_head \(128 x 96\), which needs a "
                                               r"full-module slot, but max_full_module_adapters"
                                               r"=0; .*--max-full-module-adapters"):
        LLM(str(d), adapters={"a": str(a)}, device="cpu", max_lora_rank=8)
    llm = LLM(str(d), adapters={"t": str(tokens)}, device="cpu", max_lora_rank=8)
    assert llm.generate([[1, 5, 9]], GREEDY, adapters="t")[0].finish_reason == "length"
    with pytest.raises(AdapterLoadError, match="max_full_module_adapters=0"):
        llm.load_adapter("b", str(b))

    llm = LLM(str(d), adapters={"a": str(a)}, device="cpu", max_lora_rank=8,
              max_loras_per_batch=4, max_full_module_adapters=1)
    # one slot: an embedding and an lm_head copy, float32 128 x 96 each
    assert llm.engine.full_modules.nbytes == 2 * 128 * 96 * 4
    pool = llm.engine.lora_pool
    llm.generate([[1, 5, 9]], GREEDY, adapters="a")
    assert pool.full_of.count(None) == pool.num_slots - 1  # held after the request (cached)
    llm.unload_adapter("a")
    assert pool.full_of.count(None) == pool.num_slots
    llm.load_adapter("b", str(b))
    out = llm.generate([[1, 5, 9, 17]], GREEDY, adapters="b")[0]
    with torch.no_grad():
        want = peft_model(load_hf_model(d), b).generate(
            input_ids=torch.tensor([[1, 5, 9, 17]]), max_new_tokens=10, do_sample=False,
            eos_token_id=None, min_new_tokens=10)[0, 4:]
    assert out.token_ids == want.tolist()


def test_pool_full_slots_pin_and_evict(tmp_path):
    d, hf = make_tiny_model(tmp_path / "base", "llama", tokenizer=False)
    mc, base_w = load_model_config(d)[0], CheckpointWeights(d).get
    ads = {n: load_peft_adapter(make_adapter(hf, tmp_path / n, seed=i, target_modules=["q_proj"],
                                             **kw), mc, 8, name=n, base_weight=base_w)
           for i, (n, kw) in enumerate([("f1", dict(modules_to_save=["embed_tokens"])),
                                        ("f2", dict(modules_to_save=["lm_head"])),
                                        ("p", {})])}
    dev = torch.device("cpu")
    pool = LoRASlotPool(LoRABuffers(mc, 3, 8, torch.float32, dev),
                        FullModuleBuffers(mc, 3, 1, torch.float32, dev))
    s1 = pool.pin(("f1", 1), ads["f1"])
    assert not pool.can_pin(("f2", 2), needs_full_slot=True)  # the one full slot is pinned
    assert pool.can_pin(("p", 3))
    with pytest.raises(Exception, match="every full-module slot is pinned"):
        pool.pin(("f2", 2), ads["f2"])
    sp = pool.pin(("p", 3), ads["p"])
    pool.unpin(s1)
    assert pool.can_pin(("f2", 2), needs_full_slot=True)
    # f1's lora slot gives up its full slot (and is reused) although an empty slot exists
    assert pool.pin(("f2", 2), ads["f2"]) == s1 and pool.lora_slot_of(("f1", 1)) is None
    assert pool.full_of[s1] == 0 and pool.full_of[sp] is None
    assert torch.equal(pool.full.slots[s1].lm_head, ads["f2"].replaced.lm_head)
    assert pool.full.slots[s1].embed is None


def test_refusals_name_the_field(tmp_path):
    d, hf = make_tiny_model(tmp_path / "base", "llama", tokenizer=False)
    mc, base_w = load_model_config(d)[0], CheckpointWeights(d).get
    norm = make_adapter(hf, tmp_path / "norm", seed=1, target_modules=["q_proj"],
                        modules_to_save=["model.norm"])
    with pytest.raises(AdapterLoadError, match=r"modules_to_save=\['model.norm'\] selects "
                                               r"model.norm; loraplex serves fully trained"):
        load_peft_adapter(norm, mc, 8, base_weight=base_w)
    tok = make_adapter(hf, tmp_path / "tok", seed=2, target_modules=["q_proj"],
                       trainable_token_indices=TOKENS)
    edit_adapter_config(tok, target_modules=["q_proj", "embed_tokens"])
    with pytest.raises(AdapterLoadError, match="trainable_token_indices on model.embed_tokens, "
                                               "which target_modules also puts LoRA on"):
        load_peft_adapter(tok, mc, 8, base_weight=base_w)
    edit_adapter_config(tok, target_modules=["q_proj"], trainable_token_indices=[5, 9, 999])
    with pytest.raises(AdapterLoadError, match="has token id 999, outside the base model's "
                                               r"vocabulary \(0..127\)"):
        load_peft_adapter(tok, mc, 8, base_weight=base_w)
    edit_adapter_config(tok, trainable_token_indices=[5, 9])
    with pytest.raises(AdapterLoadError, match=r"trainable_tokens_delta' has shape \(5, 96\), "
                                               r"expected \(2, 96\)"):
        load_peft_adapter(tok, mc, 8, base_weight=base_w)


def test_decode_steps_with_replaced_rows_skip_the_graphs(tmp_path):
    """Replaced rows are served per host segment, which a captured CUDA graph would freeze:
    their decode steps run eagerly, others keep the graph path (static buffers on CPU)."""
    d, hf = make_tiny_model(tmp_path / "base", "llama")
    dirs = {"full": make_adapter(hf, tmp_path / "full", seed=1, target_modules=["q_proj"],
                                 modules_to_save=["lm_head"]),
            "tokens": make_adapter(hf, tmp_path / "tok", seed=2, target_modules=["q_proj"],
                                   trainable_token_indices=TOKENS),
            "plain": make_adapter(hf, tmp_path / "plain", seed=3, target_modules=["q_proj"])}
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_lora_rank=8, max_full_module_adapters=1, cuda_graphs=True)
    graphs, calls = llm.engine.runner.graphs, []
    real_run = graphs.run
    graphs.run = lambda *a: calls.append(a) or real_run(*a)
    base = load_hf_model(d)
    for name in dirs:
        calls.clear()
        out = llm.generate([[1, 5, 9, 17]], GREEDY, adapters=name)[0]
        with torch.no_grad():
            want = peft_model(base, dirs[name]).generate(
                input_ids=torch.tensor([[1, 5, 9, 17]]), max_new_tokens=10, do_sample=False,
                eos_token_id=None, min_new_tokens=10)[0, 4:]
        assert out.token_ids == want.tolist(), name
        assert bool(calls) == (name == "plain"), name


def test_cli_flag_reaches_the_engine(tmp_path, capsys):
    from loraplex.cli import main as cli_main

    d, hf = make_tiny_model(tmp_path / "base", "llama")
    a = make_adapter(hf, tmp_path / "a", seed=1, target_modules=["q_proj"],
                     modules_to_save=["embed_tokens"])
    args = ["generate", "--model", str(d), "--device", "cpu", "--max-lora-rank", "8",
            "--adapter", f"a={a}", "--use-adapter", "a", "--prompt", "hi", "--max-tokens", "2"]
    assert cli_main(args) == 2
    assert "max_full_module_adapters=0" in capsys.readouterr().err
    assert cli_main([*args, "--max-full-module-adapters", "1"]) == 0
    assert cli_main(["serve", "--model", str(d), "--device", "cpu",
                     "--max-full-module-adapters", "-1"]) == 2
    assert "max_full_module_adapters=-1 must be >= 0" in capsys.readouterr().err


def test_lm_head_wrapper_composes_with_an_lm_head_lora_wrapper(tmp_path):
    """Around an lm_head LoRA wrapper (which reads the batch of all the logits' rows), the
    copy's wrapper asks for a batch when either needs one, and runs the wrapped module over
    every row (not the subsets a plain base linear gets)."""
    from torch import nn

    from loraplex.layers.forward_context import ForwardBatch, forward_context
    from loraplex.layers.linear import ColumnLinear
    from loraplex.lora.full_module_layers import FullModuleLMHead, install_full_module_layers
    from loraplex.lora.full_modules import ReplacedModules
    from loraplex.ops.lora_meta import LoRABatch

    class HeadLoRA(nn.Module):  # stands in for an lm_head LoRA: rows it saw, per call
        def __init__(self, base: nn.Module) -> None:
            super().__init__()
            self.base, self.live, self.rows = base, False, []

        @property
        def reads_lora_batch(self) -> bool:
            return self.live

        def forward(self, h):
            self.rows.append(h.shape[0])
            return self.base(h)

    mc = load_model_config(make_tiny_model(tmp_path / "b", "llama", tokenizer=False)[0])[0]
    g = torch.Generator().manual_seed(0)
    base = ColumnLinear(96, 128)
    base.weight.data = torch.randn(128, 96, generator=g)
    model = nn.Module()
    model.model = nn.Module()
    model.model.embed_tokens = nn.Embedding(128, 96)
    model.lm_head = HeadLoRA(base)
    buffers = FullModuleBuffers(mc, 2, 1, torch.float32, torch.device("cpu"))
    install_full_module_layers(model, buffers)
    install_full_module_layers(model, buffers)  # idempotent
    head = model.lm_head
    assert isinstance(head, FullModuleLMHead) and isinstance(head.inner, HeadLoRA)
    assert not head.reads_lora_batch
    head.inner.live = True
    assert head.reads_lora_batch  # the LoRA's need passes through
    head.inner.live = False
    copy_ = torch.randn(128, 96, generator=g)
    buffers.write(1, 0, ReplacedModules(lm_head=copy_))
    assert head.reads_lora_batch  # now its own
    h = torch.randn(5, 96, generator=g)
    batch = ForwardBatch(is_prefill=False, num_tokens=5, slot_mapping=None,
                         lora=LoRABatch.from_token_slots([-1, -1, 1, 1, 0]))
    with torch.no_grad(), forward_context(batch):
        y = head(h)
    assert head.inner.rows == [5]  # every row, once
    torch.testing.assert_close(y[2:4], h[2:4] @ copy_.T)
    torch.testing.assert_close(y[[0, 1, 4]], h[[0, 1, 4]] @ base.weight.T)
    head.inner = base  # a plain base linear: the copy's rows skip its GEMM
    calls = []
    base.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    with torch.no_grad(), forward_context(batch):
        y2 = head(h)
    assert calls == [2, 1]
    torch.testing.assert_close(y2, y)


def test_tensor_parallel_refuses_replaced_modules(tmp_path, monkeypatch):
    """Each rank's lm_head gives its vocabulary shard and the copies / rows are not sharded:
    refused by name instead of served wrong."""
    from loraplex import ConfigError
    from loraplex.engine.llm_engine import LLMEngine
    from loraplex.lora import loader

    d, hf = make_tiny_model(tmp_path / "base", "llama")
    with pytest.raises(ConfigError, match="max_full_module_adapters=1: full embedding / lm_head "
                                          "copies .* tensor_parallel_size=2 > 1"):
        LLMEngine.from_args(str(d), device="cpu", max_full_module_adapters=1,
                            tensor_parallel_size=2)
    tokens = make_adapter(hf, tmp_path / "t", seed=3, target_modules=["q_proj"],
                          trainable_token_indices=TOKENS)
    llm = LLM(str(d), device="cpu", max_lora_rank=8)
    monkeypatch.setattr(loader, "tp_size", lambda: 2)
    with pytest.raises(AdapterLoadError, match="adapter 't': modules_to_save / "
                                               "trainable_token_indices are not served with "
                                               "tensor parallelism"):
        llm.load_adapter("t", str(tokens))


def test_lm_head_copies_next_to_lm_head_lora_equal_peft(tmp_path):
    """An lm_head LoRA adapter (enable_lm_head_lora), lm_head / embedding copies, trainable
    tokens, a plain adapter and base rows in one batch: PEFT's logits and tokens each."""
    from helpers_lora import make_peft_adapter

    d, hf = make_tiny_model(tmp_path / "base", "qwen2", tie_word_embeddings=True)
    dirs = {"head_lora": make_peft_adapter(hf, tmp_path / "hl", seed=1, r=4, b_scale=0.5,
                                           target_modules=["lm_head", "q_proj"]),
            "head_copy": make_adapter(hf, tmp_path / "hc", seed=2, target_modules=["q_proj"],
                                      modules_to_save=["lm_head"]),
            "both": make_adapter(hf, tmp_path / "b", seed=3, target_modules=["v_proj"],
                                 modules_to_save=["embed_tokens", "lm_head"]),
            "tokens": make_adapter(hf, tmp_path / "t", seed=4, target_modules=["q_proj"],
                                   trainable_token_indices=TOKENS)}
    llm = LLM(str(d), adapters={k: str(v) for k, v in dirs.items()}, device="cpu",
              max_lora_rank=8, max_loras_per_batch=4, enable_lm_head_lora=True,
              max_full_module_adapters=2, max_num_batched_tokens=7)
    names = [*dirs, None, "head_lora", "head_copy"]
    prompts = _prompts(len(names), seed=11)
    scores = llm.score(prompts, adapters=names)
    gens = llm.generate(prompts, GREEDY, adapters=names)
    base = load_hf_model(d)
    for ids, name, logits, gen in zip(prompts, names, scores, gens, strict=True):
        ref = base if name is None else peft_model(base, dirs[name])
        x = torch.tensor([ids])
        with torch.no_grad():
            ref_logits = ref(input_ids=x).logits[0]
            want = ref.generate(input_ids=x, max_new_tokens=10, do_sample=False,
                                eos_token_id=None, min_new_tokens=10)[0, len(ids):]
        err = (logits - ref_logits).abs().max().item()
        assert err <= 1e-4 * ref_logits.abs().max().item(), (name, err)
        assert gen.token_ids == want.tolist(), name
