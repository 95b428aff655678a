"""Paged decode attention, before and after (prints only).

CPU: one decode step of the CPU benchmark model (8 layers, hidden 1024, 16 heads / 4 kv heads
of 64) through the engine's static-buffer path (``DecodeGraphs(capture=False)``, the path
CUDA graphs replay) at a fixed 25-token context, max_model_len 256 vs 8192. "before" is the
old ``Attention._decode`` (kept here: it gathered every column of the max_model_len-wide
table), "after" is the current one (only the columns the batch's longest context spans);
then one layer's decode attention alone, the same way.

CUDA (when available): the Triton kernel for one layer of Llama-3.2-1B (32 heads, 8 kv heads,
d 64) and Llama-3.1-8B (32 / 8, d 128) in bf16, batch 1/8/64/256 x context 256/2048/8192,
with a max_model_len-wide (8192) block table as under CUDA graphs and shuffled blocks: time
per call (CUDA-graph replays) vs the floor = K+V bytes of the real contexts / the measured
device copy bandwidth; the torch path's time alongside where it fits. Each shape's output is
checked against the torch path (a few rows) first.

    python benchmarks/bench_decode_attention.py [--threads 2] [--repeat 5] [--batch 8]
        [--cpu-only | --gpu-only]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from loraplex.config import CacheConfig, LoRAConfig, ModelConfig, RopeConfig, SchedulerConfig
from loraplex.engine.llm_engine import LLMEngine
from loraplex.layers.attention import Attention
from loraplex.layers.forward_context import ForwardBatch, forward_context
from loraplex.models.llama import LlamaForCausalLM
from loraplex.ops import paged_attention_torch, paged_attention_triton
from loraplex.sampling_params import SamplingParams


def _old_decode(self: Attention, q: torch.Tensor, batch) -> torch.Tensor:
    """``Attention._decode`` before paged attention: gathers the whole table."""
    k_cache, v_cache = batch.kv_caches[self.layer_idx]
    bsz, tables, block_size = q.shape[0], batch.block_tables, k_cache.shape[1]
    length = tables.shape[1] * block_size
    flat = tables.reshape(-1)
    keys = k_cache.index_select(0, flat).view(bsz, length, self.num_kv_heads, self.head_dim)
    values = v_cache.index_select(0, flat).view(bsz, length, self.num_kv_heads, self.head_dim)
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    qs = q.view(bsz, self.num_kv_heads, self.group, self.head_dim)
    return F.scaled_dot_product_attention(
        qs, keys, values, attn_mask=batch.decode_mask(length, q.dtype), scale=self.scale)


def cpu_engine(max_model_len: int, batch: int) -> LLMEngine:
    cfg = ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=1024,
        intermediate_size=2816, num_layers=8, num_heads=16, num_kv_heads=4, head_dim=64,
        max_position=8192, rms_norm_eps=1e-5, rope=RopeConfig(theta=10000.0),
        tie_word_embeddings=False, attention_bias=False, dtype=torch.float32)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # norm weights at 1: tiny ones would make denormals
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    model.eval()
    sched = SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=4096,
                            max_model_len=max_model_len)
    cache = CacheConfig(num_blocks=max_model_len // 16 + 4 * batch)
    return LLMEngine("<random>", cfg, model, None, sched, cache, LoRAConfig(backend="torch"),
                     torch.device("cpu"), torch.float32, cuda_graphs=True)


def cpu_step_ms(batch: int, repeat: int) -> dict[tuple[int, str], float]:
    """Best time of one static-buffer decode forward at context 25, per (max_model_len, impl)."""
    runs = {}
    for max_len in (256, 8192):
        engine = cpu_engine(max_len, batch)
        sp = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"r{i}", list(range(10 + i, 34 + i)), sp, None)  # 24 tokens
        engine.step()  # prefill (+ the 25th token)
        runner = engine.runner
        seqs = sorted(engine.requests.values(), key=lambda s: s.seq_id)
        inputs = runner._decode_lists(seqs)
        assert inputs[4] == [25] * batch, inputs[4]
        runs[max_len] = (runner, inputs)
    best: dict[tuple[int, str], float] = {}
    original = Attention._decode
    try:
        for _ in range(repeat):  # interleaved, best of ``repeat``
            for max_len, (runner, inputs) in runs.items():
                for impl, fn in (("before", _old_decode), ("after", original)):
                    Attention._decode = fn
                    t = time.perf_counter()
                    runner.graphs.run(*inputs, None)
                    ms = (time.perf_counter() - t) * 1e3
                    best[(max_len, impl)] = min(best.get((max_len, impl), float("inf")), ms)
    finally:
        Attention._decode = original
    return best


def cpu_attention_us(batch: int, repeat: int) -> dict[tuple[int, str], float]:
    """One layer's decode attention alone (cache write + attention), same shapes and inputs
    as the step above: less exposed than the whole step to a busy machine's matmul noise."""
    heads, kv_heads, d, block, ctx = 16, 4, 64, 16, 25
    g = torch.Generator().manual_seed(0)
    kc, vc = (torch.randn(8192 // block + 4 * batch, block, kv_heads, d, generator=g)
              for _ in range(2))
    q = torch.randn(batch, heads, d, generator=g)
    k, v = (torch.randn(batch, kv_heads, d, generator=g) for _ in range(2))
    lens = torch.full((batch,), ctx)
    slots = torch.tensor([(2 * b + 1) * block + ctx - 1 - block for b in range(batch)])
    layer = Attention(0, heads, kv_heads, d)
    best: dict[tuple[int, str], float] = {}
    for _ in range(repeat):
        for max_len in (256, 8192):
            tables = torch.full((batch, max_len // block), kc.shape[0] - 1)  # dummy-padded
            tables[:, :2] = torch.arange(2 * batch).view(batch, 2)
            for impl, fn in (("before", _old_decode), ("after", Attention._decode)):
                batch_meta = ForwardBatch(
                    is_prefill=False, num_tokens=batch, slot_mapping=slots, block_tables=tables,
                    context_lens=lens, max_context_len=ctx, kv_caches=[(kc, vc)])
                layer._decode = fn.__get__(layer)
                with forward_context(batch_meta):
                    t = time.perf_counter()
                    layer(q, k, v)
                    us = (time.perf_counter() - t) * 1e6
                best[(max_len, impl)] = min(best.get((max_len, impl), float("inf")), us)
    return best


def gpu_time_us(fn, reps: int = 20) -> float:
    """Median time of one ``fn()`` from CUDA-graph replays of ``reps`` back-to-back calls."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    del graph
    return sorted(times)[len(times) // 2]


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes/s (bytes read + written)."""
    src = torch.ones(1 << 28, dtype=torch.bfloat16, device="cuda")  # 512 MiB
    dst = torch.empty_like(src)
    us = gpu_time_us(lambda: dst.copy_(src), reps=5)
    return 2 * src.numel() * src.element_size() / (us * 1e-6)


def gpu_rows(max_model_len: int = 8192) -> list[str]:
    bw = copy_bandwidth()
    rows = [f"copy bandwidth {bw / 1e9:.0f} GB/s; one layer, bf16, table {max_model_len} "
            "tokens wide (as under CUDA graphs)",
            f"{'shape':9s} {'batch':>5s} {'ctx':>5s} {'splits':>6s} {'kernel us':>10s} "
            f"{'floor us':>9s} {'floor/kernel':>12s} {'GB/s':>6s} {'torch us':>9s}"]
    dtype, block = torch.bfloat16, 16
    for name, heads, kv_heads, d in (("llama-1b", 32, 8, 64), ("llama-8b", 32, 8, 128)):
        for bsz in (1, 8, 64, 256):
            for ctx in (256, 2048, 8192):
                g = torch.Generator(device="cuda").manual_seed(bsz + ctx)
                per_seq = -(-ctx // block)
                width = -(-max(ctx, max_model_len) // block)
                num_blocks = bsz * per_seq + 1
                shape = (num_blocks, block, kv_heads, d)
                kc = torch.randn(shape, generator=g, device="cuda", dtype=dtype)
                vc = torch.randn(shape, generator=g, device="cuda", dtype=dtype)
                order = torch.randperm(bsz * per_seq, generator=g, device="cuda")
                tables = torch.full((bsz, width), num_blocks - 1, dtype=torch.int64,
                                    device="cuda")
                tables[:, :per_seq] = order.view(bsz, per_seq)
                lens = torch.full((bsz,), ctx, dtype=torch.int64, device="cuda")
                q = torch.randn(bsz, heads, d, generator=g, device="cuda", dtype=dtype)
                out = torch.full_like(q, float("nan"))
                scale = d**-0.5

                def kernel(q=q, kc=kc, vc=vc, tables=tables, lens=lens, out=out,
                           scale=scale) -> None:
                    paged_attention_triton.paged_decode_attention(q, kc, vc, tables, lens,
                                                                  scale, out)

                kernel()
                rows_chk = [0, bsz - 1]
                ref = paged_attention_torch.paged_decode_attention(
                    q[rows_chk], kc, vc, tables[rows_chk, :per_seq].contiguous(),
                    lens[rows_chk], scale)
                err = (out[rows_chk].float() - ref.float()).abs().max().item()
                assert err < 2e-2, f"{name} b={bsz} ctx={ctx}: max error {err}"
                us = gpu_time_us(kernel)
                nbytes = 2 * bsz * ctx * kv_heads * d * kc.element_size()
                floor = nbytes / bw * 1e6
                torch_us = "-"
                if bsz * ctx <= 64 * 2048:  # the gathered copy must fit comfortably

                    def gather(q=q, kc=kc, vc=vc, narrow=tables[:, :per_seq], lens=lens,
                               out=out, scale=scale) -> None:
                        paged_attention_torch.paged_decode_attention(q, kc, vc, narrow, lens,
                                                                     scale, out)

                    torch_us = f"{gpu_time_us(gather):.1f}"
                splits = paged_attention_triton.num_splits(
                    bsz, kv_heads, heads, d, width * block,
                    paged_attention_triton._tile_tokens(d, q.element_size()), q.device)
                rows.append(f"{name:9s} {bsz:5d} {ctx:5d} {splits:6d} {us:10.1f} {floor:9.1f} "
                            f"{floor / us:12.2f} {nbytes / us / 1e3:6.0f} {torch_us:>9s}")
                del kc, vc
                torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--gpu-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.gpu_only:
        best = cpu_step_ms(args.batch, args.repeat)
        print(f"CPU, {args.threads} threads: decode step (static-buffer path, 8 layers, batch "
              f"{args.batch}, context 25), best of {args.repeat}, ms")
        print(f"{'max_model_len':>13s} {'before':>8s} {'after':>8s} {'before/after':>12s}")
        for max_len in (256, 8192):
            b, a = best[(max_len, "before")], best[(max_len, "after")]
            print(f"{max_len:13d} {b:8.2f} {a:8.2f} {b / a:12.2f}x")
        attn = cpu_attention_us(args.batch, 4 * args.repeat)
        print(f"\none layer's decode attention alone, best of {4 * args.repeat}, us")
        print(f"{'max_model_len':>13s} {'before':>8s} {'after':>8s} {'before/after':>12s}")
        for max_len in (256, 8192):
            b, a = attn[(max_len, "before")], attn[(max_len, "after")]
            print(f"{max_len:13d} {b:8.0f} {a:8.0f} {b / a:12.2f}x")
    if not args.cpu_only and torch.cuda.is_available():
        print("\n".join(gpu_rows()))


if __name__ == "__main__":
    main()
