"""Compile the exact launches ``paged_prefill_triton`` makes for real shapes to sm_90 cubins,
on a machine without a GPU (Triton ships ptxas), and report registers, spills and shared
memory: proof that the extend kernel builds for Hopper with the tile sizes chosen for them.

``python -m loraplex.ops.paged_prefill_aot [--quick]`` (must run without ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import torch

from loraplex.ops import paged_prefill_kernels as K
from loraplex.ops import paged_prefill_triton
from loraplex.ops import triton_aot as aot
from loraplex.ops.paged_attention_aot import LAYER_SHAPES
from loraplex.ops.triton_aot import Launch

KERNELS = ("paged_prefill_kernel",)


def record_launches(bsz: int, chunk: int, context: int, heads: int, kv_heads: int, d: int,
                    dtype: torch.dtype, softcap: float | None = None,
                    block_size: int = 16) -> list[Launch]:
    """The launch for ``bsz`` chunks of ``chunk`` tokens over ``context``-token contexts."""
    meta = dict(device="meta")
    width = -(-context // block_size)
    q = torch.empty(bsz * chunk, heads, d, dtype=dtype, **meta)
    cache = torch.empty(4 * bsz * width, block_size, kv_heads, d, dtype=dtype, **meta)
    tables = torch.empty(bsz, width, dtype=torch.int64, **meta)
    cu = torch.empty(bsz + 1, dtype=torch.int64, **meta)
    lens = torch.empty(bsz, dtype=torch.int64, **meta)
    with aot.recording_launches(K, KERNELS) as log:
        paged_prefill_triton.paged_prefill_attention(
            q, cache, cache, tables, cu, lens, d**-0.5, max_query_len=chunk,
            max_context_len=context, softcap=softcap)
    return log


def main(argv: list[str] | None = None) -> int:
    """Compile every distinct launch of the layer shapes, with and without softcap;
    ``--quick``: bf16 only."""
    import sys

    quick = "--quick" in (sys.argv[1:] if argv is None else argv)
    dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
    seen: set[tuple] = set()
    for dtype in dtypes:
        for name, heads, kv_heads, d in LAYER_SHAPES:
            for softcap in (None, 50.0):
                for launch in record_launches(4, 512, 2048, heads, kv_heads, d, dtype, softcap):
                    key = (launch.kernel, dtype, tuple(sorted(launch.kwargs.items())))
                    if key in seen:
                        continue
                    seen.add(key)
                    c = aot.compile_launch(K, launch)
                    print(f"{launch.kernel:21s} {str(dtype)[6:]:8s} {name:9s} "
                          f"grid={launch.grid} {aot.describe(c)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
