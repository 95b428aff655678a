"""Compile the exact launches ``paged_attention_triton`` makes for real shapes to sm_90 cubins,
on a machine without a GPU (Triton ships ptxas), and report registers, spills and shared
memory: proof that the kernels build for Hopper with the tile sizes chosen for those shapes.

``python -m loraplex.ops.paged_attention_aot`` (must run without ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from loraplex.ops import paged_attention_kernels as K
from loraplex.ops import paged_attention_triton
from loraplex.ops import triton_aot as aot
from loraplex.ops.triton_aot import Launch

KERNELS = ("paged_decode_split_kernel", "paged_decode_reduce_kernel")
# (name, heads, kv heads, head dim): Llama-3.2-1B, Llama-3.1-8B, and an MHA / d=256 corner
LAYER_SHAPES = (("llama-1b", 32, 8, 64), ("llama-8b", 32, 8, 128), ("mha-d32", 8, 8, 32),
                ("gqa7-d256", 28, 4, 256))
# windowed / soft-capped layers: (name, heads, kv heads, head dim, sliding window, softcap)
WINDOWED_SHAPES = (("gemma2-2b-local", 8, 4, 256, 4096, 50.0),)


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Within the block, the paged attention kernels' launches are recorded instead of run."""
    with aot.recording_launches(K, KERNELS) as log:
        yield log


def record_launches(bsz: int, heads: int, kv_heads: int, d: int, max_context: int,
                    dtype: torch.dtype, block_size: int = 16, sliding_window: int | None = None,
                    softcap: float | None = None) -> list[Launch]:
    meta = dict(device="meta")
    width = -(-max_context // block_size)
    q = torch.empty(bsz, heads, d, dtype=dtype, **meta)
    cache = torch.empty(4 * bsz * width, block_size, kv_heads, d, dtype=dtype, **meta)
    tables = torch.empty(bsz, width, dtype=torch.int64, **meta)
    lens = torch.empty(bsz, dtype=torch.int64, **meta)
    with recording_launches() as log:
        paged_attention_triton.paged_decode_attention(q, cache, cache, tables, lens, d**-0.5,
                                                      sliding_window=sliding_window,
                                                      softcap=softcap)
    return log


def main(argv: list[str] | None = None) -> int:
    """Compile every distinct launch of the layer shapes at batch/context 1/8192 (many
    splits), 64/2048 and 256/256 (one split); ``--quick``: bf16 and fp32, two of them."""
    import sys

    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    dtypes = (torch.bfloat16, torch.float32) if quick else (torch.bfloat16, torch.float16,
                                                             torch.float32)
    configs = ((1, 8192), (256, 256)) if quick else ((1, 8192), (64, 2048), (256, 256))
    seen: set[tuple] = set()
    for dtype in dtypes:
        shapes = [(*shape, None, None) for shape in LAYER_SHAPES] + list(WINDOWED_SHAPES)
        for name, heads, kv_heads, d, window, softcap in shapes:
            for bsz, ctx in configs:
                for launch in record_launches(bsz, heads, kv_heads, d, ctx, dtype,
                                              sliding_window=window, softcap=softcap):
                    key = (launch.kernel, dtype, tuple(sorted(launch.kwargs.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    c = aot.compile_launch(K, launch)
                    print(f"{launch.kernel:27s} {str(dtype)[6:]:8s} {name:9s} b={bsz} "
                          f"ctx={ctx} grid={launch.grid} {aot.describe(c)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
