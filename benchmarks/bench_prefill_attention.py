"""Extend attention (prefill chunks over their cached prefix), side by side with plain causal
SDPA on the same total tokens (prints only).

CPU (torch backend, one layer of the CPU benchmark model: 16 heads / 4 kv heads of 64, fp32,
blocks of 16, a max_model_len-wide table of 8192 tokens as the engine passes it):
  (a) a whole prompt as one chunk with nothing cached, vs ``F.scaled_dot_product_attention``
      with ``is_causal`` on the same tokens (what ``Attention._prefill`` runs today);
  (b) the same prompt as 4 chunks over a growing cached prefix (4 calls), vs (a)'s SDPA;
  (c) a mixed step: 8 decodes (contexts 512) + one 256-token chunk after 768 cached tokens in
      one call, vs the same work as two calls (decode op + extend of the chunk alone);
  (d) 8 layers of one mixed step (32 decodes over contexts 100..1000 + two chunks, with the
      host lengths the engine passes), the layers sharing one ``ExtendPlan`` (the groups'
      indices, tables and masks built once per step) vs each layer building its own.
Each row: best of ``--repeat`` interleaved runs, ms, and the ratio extend / baseline.

GPU (when CUDA is there, or ``--dry-run``: tiny shapes on CPU through the Triton interpreter,
same code path): one layer of Llama-3.1-8B (32 / 8 heads, d 128) in bf16, the Triton kernel vs
SDPA causal (flash) on the same tokens and vs the torch backend, chunks of 512/2048 after
prefixes of 0/2048/8192, time per call (CUDA-graph replays) and TFLOP/s of the causal work.
Each point is checked against the torch backend first.

    python benchmarks/bench_prefill_attention.py [--threads 2] [--repeat 5] [--prompt 1024]
        [--cpu-only | --gpu-only] [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

if "--dry-run" in sys.argv:  # the kernel runs interpreted on CPU: set before it is defined
    os.environ["TRITON_INTERPRET"] = "1"

from loraplex.ops import paged_attention_torch, paged_prefill_torch  # noqa: E402

BLOCK = 16


def make_step(chunks: list[tuple[int, int]], heads: int, kv_heads: int, d: int,
              dtype: torch.dtype, device: str, table_tokens: int = 8192, seed: int = 0) -> dict:
    """Caches and metadata for one step of ``(prefix, chunk)`` sequences; blocks shuffled."""
    g = torch.Generator(device=device).manual_seed(seed)
    need = [-(-(p + c) // BLOCK) for p, c in chunks]
    width = max(max(need), table_tokens // BLOCK)
    num_blocks = sum(need) + 1
    kc, vc = (torch.randn(num_blocks, BLOCK, kv_heads, d, generator=g, device=device,
                          dtype=dtype) for _ in range(2))
    order = torch.randperm(num_blocks - 1, generator=g, device=device)
    tables = torch.full((len(chunks), width), num_blocks - 1, dtype=torch.int64, device=device)
    start = 0
    for b, n in enumerate(need):
        tables[b, :n] = order[start : start + n]
        start += n
    cu = [0]
    for _, c in chunks:
        cu.append(cu[-1] + c)
    q = torch.randn(cu[-1], heads, d, generator=g, device=device, dtype=dtype)
    ctx = [p + c for p, c in chunks]
    return dict(q=q, k_cache=kc, v_cache=vc, block_tables=tables,
                cu_seqlens_q=torch.tensor(cu, device=device),
                context_lens=torch.tensor(ctx, device=device), scale=d**-0.5,
                max_query_len=max(c for _, c in chunks), max_context_len=max(ctx),
                cu_seqlens_q_host=cu)


def extend(step: dict, fn=paged_prefill_torch.paged_prefill_attention, **kw) -> torch.Tensor:
    s = dict(step)
    args = [s.pop(k) for k in ("q", "k_cache", "v_cache", "block_tables", "cu_seqlens_q",
                               "context_lens", "scale")]
    if fn is not paged_prefill_torch.paged_prefill_attention:
        s.pop("cu_seqlens_q_host")  # only the torch backend takes it (the op checks it)
        s.pop("context_lens_host", None)
    return fn(*args, **s, **kw)


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """[T, H, d] x [T, KVH, d] -> [T, H, d], causal, one sequence (k/v heads repeated: the
    layer's path on torch < 2.5, and SDPA's own GQA handling otherwise costs the same)."""
    group = q.shape[1] // k.shape[1]
    qs, ks, vs = (x.transpose(0, 1)[None] for x in (q, k, v))
    ks, vs = (x.repeat_interleave(group, 1) for x in (ks, vs))
    return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)[0]


def best_ms(fns: dict, repeat: int, sync=lambda: None) -> dict[str, float]:
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):  # interleaved, so a busy machine hits every side alike
        for name, fn in fns.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t) * 1e3)
    return best


def cpu_rows(prompt: int, repeat: int) -> list[str]:
    heads, kv_heads, d, dtype = 16, 4, 64, torch.float32
    whole = make_step([(0, prompt)], heads, kv_heads, d, dtype, "cpu")
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(prompt, kv_heads, d, generator=g) for _ in range(2))
    part = prompt // 4
    chunked = [make_step([(i * part, part)], heads, kv_heads, d, dtype, "cpu", seed=i)
               for i in range(4)]
    mixed_seqs = [(511, 1)] * 8 + [(768, 256)]
    mixed = make_step(mixed_seqs, heads, kv_heads, d, dtype, "cpu")
    dec = make_step(mixed_seqs[:8], heads, kv_heads, d, dtype, "cpu")
    alone = make_step(mixed_seqs[8:], heads, kv_heads, d, dtype, "cpu")
    dec_tables = dec["block_tables"][:, : -(-512 // BLOCK)]
    step_seqs = [(99 + 29 * i, 1) for i in range(32)] + [(768, 256), (0, 96)]
    step = make_step(step_seqs, heads, kv_heads, d, dtype, "cpu")
    step["context_lens_host"] = step["context_lens"].tolist()

    def layers(shared: bool) -> None:
        plan = paged_prefill_torch.ExtendPlan() if shared else None
        for _ in range(8):
            extend(step, plan=plan)
    fns = {
        "sdpa": lambda: causal_sdpa(whole["q"], k, v, whole["scale"]),
        "one": lambda: extend(whole),
        "chunks": lambda: [extend(s) for s in chunked],
        "mixed": lambda: extend(mixed),
        "split": lambda: (paged_attention_torch.paged_decode_attention(
            dec["q"], dec["k_cache"], dec["v_cache"], dec_tables, dec["context_lens"],
            dec["scale"]), extend(alone)),
        "shared": lambda: layers(True),
        "per layer": lambda: layers(False),
    }
    t = best_ms(fns, repeat)
    head = f"{'case':62s} {'extend ms':>9s} {'base ms':>8s} {'extend/base':>11s}"
    rows = [f"CPU, {torch.get_num_threads()} threads, one layer (16/4 heads, d 64, fp32), "
            f"best of {repeat}", head]
    for label, a, b in ((f"(a) {prompt} tokens, no prefix vs SDPA causal", "one", "sdpa"),
                        (f"(b) 4 chunks of {part} over the prefix vs SDPA", "chunks", "sdpa"),
                        ("(c) 8 decodes + 256 after 768: 1 call vs 2", "mixed", "split"),
                        ("(d) 8 layers, 32 decodes + 2 chunks: plan shared vs per layer",
                         "shared", "per layer")):
        rows.append(f"{label:62s} {t[a]:9.2f} {t[b]:8.2f} {t[a] / t[b]:10.2f}x")
    return rows


def gpu_rows(dry_run: bool) -> list[str]:
    from loraplex.ops import paged_prefill_triton

    device = "cpu" if dry_run else "cuda"
    heads, kv_heads, d = (4, 2, 32) if dry_run else (32, 8, 128)
    dtype = torch.float32 if dry_run else torch.bfloat16
    points = ([(0, 16), (32, 16)] if dry_run else
              [(p, c) for c in (512, 2048) for p in (0, 2048, 8192)])
    sync = (lambda: None) if dry_run else torch.cuda.synchronize
    rows = [f"{'dry run (CPU, interpreted)' if dry_run else torch.cuda.get_device_name()}: one "
            f"layer ({heads}/{kv_heads} heads, d {d}, {str(dtype)[6:]}), 4 sequences a point",
            f"{'prefix':>6s} {'chunk':>6s} {'triton ms':>9s} {'sdpa ms':>8s} {'torch ms':>8s} "
            f"{'TFLOP/s':>7s} {'triton/sdpa':>11s}"]
    for prefix, chunk in points:
        step = make_step([(prefix, chunk)] * 4, heads, kv_heads, d, dtype, device)
        got = extend(step, paged_prefill_triton.paged_prefill_attention)
        want = extend(step)
        err = (got.float() - want.float()).abs().max().item()
        assert err < 3e-2, f"prefix {prefix} chunk {chunk}: max error {err}"
        g = torch.Generator(device=device).manual_seed(2)
        total = prefix + chunk  # SDPA over the same queries' whole causal context, no cache
        q4 = torch.randn(4, heads, total, d, generator=g, device=device, dtype=dtype)
        k4, v4 = (torch.randn(4, heads, total, d, generator=g, device=device, dtype=dtype)
                  for _ in range(2))
        q4 = q4[:, :, prefix:]
        mask = None if prefix == 0 else (
            torch.arange(total, device=device)[None, :]
            <= torch.arange(prefix, total, device=device)[:, None])
        fns = {
            "triton": lambda s=step: extend(s, paged_prefill_triton.paged_prefill_attention),
            "sdpa": lambda q4=q4, k4=k4, v4=v4, m=mask: F.scaled_dot_product_attention(
                q4, k4, v4, attn_mask=m, is_causal=m is None),
            "torch": lambda s=step: extend(s),
        }
        t = best_ms(fns, 2 if dry_run else 10, sync)
        flops = 4 * 4 * heads * d * sum(prefix + j + 1 for j in range(chunk))
        rows.append(f"{prefix:6d} {chunk:6d} {t['triton']:9.3f} {t['sdpa']:8.3f} "
                    f"{t['torch']:8.3f} {flops / t['triton'] / 1e9:7.1f} "
                    f"{t['triton'] / t['sdpa']:10.2f}x")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--cpu-only", action="store_true")
    ap.add_argument("--gpu-only", action="store_true")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not args.gpu_only:
        print("\n".join(cpu_rows(args.prompt, args.repeat)))
    if not args.cpu_only and (args.dry_run or torch.cuda.is_available()):
        print("\n".join(gpu_rows(args.dry_run)))


if __name__ == "__main__":
    main()
