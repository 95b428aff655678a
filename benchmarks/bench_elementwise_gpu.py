"""One decoder layer's elementwise ops, torch path vs fused Triton kernels (CUDA only; prints
only).

Llama-3.2-1B shapes (hidden 2048, 32 heads / 8 kv heads of 64, intermediate 8192) in bf16, at
batch (tokens) 1, 8, 64, 512 and 4096: per layer, the torch path's add + RMSNorm, rotary of
the fused q/k view, add + RMSNorm and SiLU*up against ``rms_norm(residual=...)``, ``rotary_``,
``rms_norm(residual=...)`` and ``silu_mul``. Each side is captured in one CUDA graph holding 16
copies of the layer's ops (as 16 layers would) and timed by replays; the floor is the bytes the
fused ops must move / the measured device copy bandwidth. Outputs are checked against the torch
path first.

    python benchmarks/bench_elementwise_gpu.py [--repeat 50] [--tokens 1 8 64]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from loraplex.config import RopeConfig
from loraplex.layers.norm import RMSNorm
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.ops import elementwise_triton as E

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 2048, 32, 8, 64, 8192, 16
DTYPE = torch.bfloat16


def _inputs(t: int) -> dict[str, torch.Tensor]:
    dev = "cuda"
    return {
        "x": torch.randn(t, HIDDEN, dtype=DTYPE, device=dev),
        "res": torch.randn(t, HIDDEN, dtype=DTYPE, device=dev),
        "qkv": torch.randn(t, (HEADS + 2 * KV_HEADS) * HEAD_DIM, dtype=DTYPE, device=dev),
        "gu": torch.randn(t, 2 * INTER, dtype=DTYPE, device=dev),
        "pos": torch.arange(t, device=dev) % 4096,
    }


def _layer_torch(norm: RMSNorm, rope: RotaryEmbedding, a: dict) -> list[torch.Tensor]:
    """-> [x + res, norm(norm(x + res) + x + res), rotated q/k, silu(gate) * up]."""
    t, q_kv = a["x"].shape[0], HEADS + KV_HEADS
    cs = rope.lookup(a["pos"], DTYPE)
    s1 = a["x"] + a["res"]
    h1 = norm._torch(s1)  # stands in for the attention output
    qk = RotaryEmbedding.rotate(cs, a["qkv"][:, : q_kv * HEAD_DIM].view(t, q_kv, HEAD_DIM))
    h2 = norm._torch(h1.add_(s1))
    gate, up = a["gu"].chunk(2, dim=-1)
    return [s1, h2, qk, F.silu(gate).mul_(up)]


def _layer_fused(norm: RMSNorm, rope: RotaryEmbedding, a: dict) -> list[torch.Tensor]:
    """The same in four kernels (plus the cos/sin lookup); adds into ``a["x"]`` and rotates
    ``a["qkv"]`` in place (timed replays let x grow by res each time: finite in bf16)."""
    t, q_kv = a["x"].shape[0], HEADS + KV_HEADS
    cs = rope.lookup(a["pos"], DTYPE)
    s1 = a["x"]
    h1 = E.rms_norm(s1, norm.weight, norm.eps, residual=a["res"])
    qk = E.rotary_(a["qkv"][:, : q_kv * HEAD_DIM].view(t, q_kv, HEAD_DIM), *cs)
    h2 = E.rms_norm(h1, norm.weight, norm.eps, residual=s1)
    return [s1, h2, qk, E.silu_mul(a["gu"])]


def _time_graph(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(LAYERS):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / repeat / LAYERS  # us per layer


def _copy_bandwidth() -> float:
    a = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (start.elapsed_time(end) * 1e-3)  # bytes / s


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512, 4096])
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_elementwise_gpu: needs CUDA")
    bw = _copy_bandwidth()
    norm = RMSNorm(HIDDEN, 1e-5).to("cuda", DTYPE)
    norm.weight.data.normal_(1.0, 0.1)
    rope = RotaryEmbedding(HEAD_DIM, 4096, RopeConfig(theta=500000.0)).to("cuda")
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s; us per layer (16 layers in one graph)")
    print(f"{'tokens':>6} {'torch':>9} {'fused':>9} {'ratio':>6} {'floor':>8}")
    for t in args.tokens:
        a = _inputs(t)
        ref = _layer_torch(norm, rope, a)
        got = _layer_fused(norm, rope, {**a, "x": a["x"].clone(), "qkv": a["qkv"].clone()})
        for name, g, r in zip(("sum", "norm", "rotary", "silu*up"), got, ref, strict=True):
            err = ((g.float() - r.float()).abs().max() / r.float().abs().max()).item()
            assert err < 2e-2, f"{name}: relative error {err:.3g} at {t} tokens"
        torch_us = _time_graph(lambda a=a: _layer_torch(norm, rope, a), args.repeat)
        fused_us = _time_graph(lambda a=a: _layer_fused(norm, rope, a), args.repeat)
        elems = 2 * (3 * t * HIDDEN) + 2 * t * (HEADS + KV_HEADS) * HEAD_DIM + 3 * t * INTER
        floor_us = elems * 2 / bw * 1e6
        print(f"{t:>6} {torch_us:>9.1f} {fused_us:>9.1f} {torch_us / fused_us:>5.2f}x "
              f"{floor_us:>8.2f}")


if __name__ == "__main__":
    main()
