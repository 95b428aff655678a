"""Full decode step of a 4-layer Llama-8B-shaped random model: 32 requests over 32 distinct
rank-16 adapters (all seven projections) vs the same requests on the base model, through the
real engine (scheduler, CUDA-graph replay, sampling). Used by bench_lora_ops_gpu.py.

``dry=True`` runs a tiny model on CPU to prove the code path.
"""

from __future__ import annotations

import time

import torch

from loraplex.config import CacheConfig, LoRAConfig, ModelConfig, RopeConfig, SchedulerConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.lora.adapter import LoRAAdapter, LoRAWeights
from loraplex.models.llama import LlamaForCausalLM
from loraplex.sampling_params import SamplingParams

PROJS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama8b_config(layers: int, dry: bool) -> ModelConfig:
    if dry:
        h, i, heads, kv, d, vocab = 128, 256, 4, 2, 32, 1000
    else:
        h, i, heads, kv, d, vocab = 4096, 14336, 32, 8, 128, 128256
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=vocab, hidden_size=h, intermediate_size=i,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=d, max_position=8192,
        rms_norm_eps=1e-5, rope=RopeConfig(theta=500000.0), tie_word_embeddings=False,
        attention_bias=False, dtype=torch.bfloat16)


def random_adapter(cfg: ModelConfig, name: str, rank: int, seed: int) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for layer in range(cfg.num_layers):
        for proj, (fin, fout) in cfg.proj_shapes().items():
            weights[(layer, proj)] = LoRAWeights(
                a=torch.randn(rank, fin, generator=g) / fin**0.5,
                b=torch.randn(fout, rank, generator=g) * 0.01, scaling=2.0)
    return LoRAAdapter(name=name, path="<random>", weights=weights)


def build_engine(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, n_adapters: int,
                 rank: int, batch: int, graphs: bool) -> LLMEngine:
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.data = (torch.randn_like(p, dtype=torch.float32) * 0.02).to(dtype)
    model.eval()
    sched = SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=8192, max_model_len=512)
    lora = LoRAConfig(max_loras_per_batch=n_adapters, max_lora_rank=rank,
                      backend="triton" if device.type == "cuda" else "torch")
    engine = LLMEngine("<random>", cfg, model, None, sched, CacheConfig(num_blocks=batch * 34),
                       lora, device, dtype, cuda_graphs=graphs)
    for i in range(n_adapters):
        engine.load_adapter(f"lora{i}", "<random>", random_adapter(cfg, f"lora{i}", rank, i))
    return engine


def time_decode_steps(engine: LLMEngine, adapters: list[str | None], steps: int,
                      prompt_len: int = 128) -> float:
    """Median seconds of one engine.step() in steady decode."""
    sp = SamplingParams(max_tokens=steps + 8, temperature=0, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    for i, a in enumerate(adapters):
        ids = torch.randint(3, engine.model_config.vocab_size, (prompt_len,), generator=g)
        engine.add_request(f"r{i}-{a}", ids.tolist(), sp, a)
    engine.step()  # prefill
    for _ in range(3):
        engine.step()
    times = []
    for _ in range(steps):
        if engine.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        outs = engine.step()
        times.append(time.perf_counter() - t)  # step() syncs (sampled ids to host)
        assert len(outs) == len(adapters)
    for i, a in enumerate(adapters):
        engine.abort_request(f"r{i}-{a}")
    times.sort()
    return times[len(times) // 2]


def run(dry: bool, batch: int = 32, n_adapters: int = 32, rank: int = 16) -> str:
    device = torch.device("cpu" if dry else "cuda")
    dtype = torch.float32 if dry else torch.bfloat16
    cfg = llama8b_config(4, dry)
    steps = 5 if dry else 30
    rows = []
    for graphs in ([False] if dry else [True, False]):
        engine = build_engine(cfg, device, dtype, n_adapters, rank, batch, graphs)
        base = time_decode_steps(engine, [None] * batch, steps)
        mixed = time_decode_steps(engine, [f"lora{i % n_adapters}" for i in range(batch)], steps)
        one = time_decode_steps(engine, ["lora0"] * batch, steps)
        mode = "CUDA graphs" if graphs else "eager"
        rows.append(f"| {mode} | {base * 1e3:.3f} | {mixed * 1e3:.3f} | {mixed / base:.3f}x | "
                    f"{one * 1e3:.3f} | {one / base:.3f}x |")
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    name = "CPU dry run (tiny shapes)" if dry else torch.cuda.get_device_name()
    return (f"## Decode step: 4-layer Llama-8B shape, {batch} requests, rank {rank} on all seven "
            f"projections ({name}, {str(dtype)[6:]})\n\n"
            f"Median wall time of one `engine.step()` (schedule, replay, sample), ms.\n\n"
            f"| mode | base | {n_adapters} distinct adapters | mixed / base | one adapter "
            f"| one / base |\n|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    import sys

    print(run(dry="--dry-run" in sys.argv or not torch.cuda.is_available()))
