"""Compile the launches ``elementwise_triton`` makes for real model shapes to sm_90 cubins on a
machine without a GPU (Triton ships ptxas), and report registers, spills and shared memory:
proof that the fused norm / rotary / SiLU*up kernels build for Hopper with the chosen blocks.

``python -m loraplex.ops.elementwise_aot`` (must run without ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from loraplex.ops import elementwise_triton as E
from loraplex.ops import triton_aot as aot
from loraplex.ops.triton_aot import Launch

KERNELS = ("_rms_norm_kernel", "_rotary_kernel", "_silu_mul_kernel")
# (name, hidden, heads, kv heads, head dim, intermediate): Llama-3.2-1B, Llama-3.1-8B, an odd one
SHAPES = (("llama-1b", 2048, 32, 8, 64, 8192), ("llama-8b", 4096, 32, 8, 128, 14336),
          ("odd", 1000, 7, 1, 96, 2500))


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Within the block, the elementwise kernels' launches are recorded instead of run."""
    with aot.recording_launches(E, KERNELS) as log:
        yield log


def record_launches(tokens: int, hidden: int, heads: int, kv_heads: int, d: int, inter: int,
                    dtype: torch.dtype) -> list[Launch]:
    """One decoder layer's launches (meta tensors: nothing is allocated or run)."""
    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device="meta")

    x, w = empty(tokens, hidden), empty(hidden)
    qkv = empty(tokens, (heads + 2 * kv_heads) * d)
    qk = qkv[:, : (heads + kv_heads) * d].view(tokens, heads + kv_heads, d)
    cos = empty(tokens, 1, d)
    with recording_launches() as log:
        E.rms_norm(x, w, 1e-5)
        E.rms_norm(x, w, 1e-5, residual=empty(tokens, hidden))
        E.rotary_(qk, cos, cos)
        E.silu_mul(empty(tokens, 2 * inter))
    return log


def main() -> int:
    seen: set[tuple] = set()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for name, *shape in SHAPES:
            for launch in record_launches(4, *shape, dtype):
                key = (launch.kernel, dtype, tuple(sorted(launch.kwargs.items())))
                if key in seen:
                    continue
                seen.add(key)
                c = aot.compile_launch(E, launch)
                print(f"{launch.kernel:17s} {str(dtype)[6:]:8s} {name:8s} grid={launch.grid} "
                      f"{aot.describe(c)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
