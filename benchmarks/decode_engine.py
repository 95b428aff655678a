"""The loraplex side of ``bench_decode_gpu.py``: random models and adapters built directly on
the device (no safetensors round trip), engines over them, and decode steps timed at a real
context without running the prefill that would produce it.

``inject_decoding`` is the one place that knows engine internals (the scheduler's running
list, the block manager, adapter pinning): it makes requests look prefilled over a KV cache
of random values, so the next ``engine.step()`` is a decode at the requested context.
"""

from __future__ import annotations

import statistics
import time

import torch

from loraplex.config import CacheConfig, LoRAConfig, ModelConfig, RopeConfig, SchedulerConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.lora.adapter import LoRAAdapter, LoRAWeights
from loraplex.models.llama import LlamaForCausalLM
from loraplex.sampling_params import SamplingParams


def model_config(shape: tuple, max_position: int) -> ModelConfig:
    layers, h, i, heads, kv, d, vocab, tied = shape
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=h, intermediate_size=i,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=d,
        max_position=max_position, rms_norm_eps=1e-5, rope=RopeConfig(theta=500000.0),
        tie_word_embeddings=tied, attention_bias=False, dtype=torch.bfloat16)


@torch.no_grad()
def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """Random weights (std 0.02; norms 1) in ``dtype``, made on ``device``."""
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    for p in model.parameters():  # one parameter at a time: no second full-size copy
        if p.dim() == 2:
            p.data = torch.empty_like(p, dtype=dtype).normal_(0.0, 0.02)
        else:
            p.data = p.data.to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def random_adapters(cfg: ModelConfig, n: int, rank: int, device: torch.device,
                    dtype: torch.dtype) -> list[LoRAAdapter]:
    """``n`` rank-``rank`` adapters on all seven projections, built on ``device``."""
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for k in range(n):
        weights = {}
        for layer in range(cfg.num_layers):
            for proj, (fin, fout) in cfg.proj_shapes().items():
                a = torch.randn(rank, fin, generator=g, device=device, dtype=dtype) / fin**0.5
                b = torch.randn(fout, rank, generator=g, device=device, dtype=dtype) * 0.01
                weights[(layer, proj)] = LoRAWeights(a=a, b=b, scaling=2.0)
        out.append(LoRAAdapter(name=f"lora{k}", path="<random>", weights=weights))
    return out


@torch.no_grad()
def build_engine(model, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                 adapters: list[LoRAAdapter], rank: int, max_num_seqs: int, max_model_len: int,
                 num_blocks: int) -> LLMEngine:
    """An engine over ``model`` (CUDA graphs and Triton LoRA on CUDA; the same static-buffer
    decode path, eager, on CPU) with ``adapters`` registered and a KV cache of random values."""
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                            max_num_batched_tokens=max(2048, max_model_len))
    lora = LoRAConfig(max_loras_per_batch=max(1, len(adapters)), max_lora_rank=rank,
                      backend="triton" if device.type == "cuda" else "torch")
    engine = LLMEngine("<random>", cfg, model, None, sched, CacheConfig(num_blocks=num_blocks),
                       lora, device, dtype, cuda_graphs=True)
    for a in adapters:
        engine.load_adapter(a.name, "<random>", a)
    for k, v in engine.kv_caches:
        k.normal_()
        v.normal_()
    return engine


def inject_decoding(engine: LLMEngine, context: int, params: SamplingParams,
                    adapters: list[str | None]) -> list[str]:
    """One request per entry of ``adapters``, each ``context`` tokens long and already
    "prefilled": KV blocks allocated (their random contents stand for the prefix), adapter
    pinned, running. Returns the request ids (abort them to free everything)."""
    g = torch.Generator().manual_seed(context)
    vocab = engine.model_config.vocab_size
    rids = []
    for i, name in enumerate(adapters):
        rid = f"bench-{i}"
        ids = torch.randint(3, vocab, (context,), generator=g).tolist()
        gen = None if name is None else engine.check_adapter(name).generation
        seq = Sequence(next(engine._ids), rid, ids, params, name, gen, seed=1000 + i)
        if name is not None:  # pin its lora slot as admission would
            sched = engine.scheduler
            state, weights = sched._adapter_state(seq)
            assert state == "ready", state
            seq.lora_slot = sched.pool.pin(sched._key(seq), weights)
        engine.blocks.allocate(seq.seq_id, context)
        seq.num_computed_tokens = context - 1  # the last token is the next step's decode
        seq.status = SequenceStatus.RUNNING
        engine.scheduler.running.append(seq)
        engine.requests[rid] = seq
        rids.append(rid)
    return rids


def time_engine_steps(engine: LLMEngine, batch: int, context: int, greedy: bool,
                      adapters: list[str | None], steps: int, warmup: int = 3) -> float:
    """Median seconds of one ``engine.step()`` decoding ``batch`` requests at ``context``."""
    params = SamplingParams(max_tokens=warmup + steps + 2, ignore_eos=True, seed=None,
                            **({"temperature": 0.0} if greedy
                               else {"temperature": 0.8, "top_p": 0.95}))
    rids = inject_decoding(engine, context, params, adapters)
    try:
        times = []
        for k in range(warmup + steps):
            if engine.device.type == "cuda":
                torch.cuda.synchronize(engine.device)
            t = time.perf_counter()
            outs = engine.step()  # returns sampled ids on the host: the step has synced
            if k >= warmup:
                times.append(time.perf_counter() - t)
            assert len(outs) == batch, (len(outs), batch)
    finally:
        for rid in rids:
            engine.abort_request(rid)
    return statistics.median(times)
