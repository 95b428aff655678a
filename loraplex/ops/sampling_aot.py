"""Compile the fused sampler's launches (``sampling_triton``) for sm_90 without a GPU and report
registers, spills and shared memory: proof that the kernel builds for Hopper.

``python -m loraplex.ops.sampling_aot`` (must run without ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import torch

from loraplex.ops import sampling_triton as S
from loraplex.ops import triton_aot as aot
from loraplex.ops.triton_aot import Launch

KERNELS = ("_sample_kernel",)


def record_launches(batch: int, vocab: int, dtype: torch.dtype) -> list[Launch]:
    """The launch ``fused_sample`` makes for ``[batch, vocab]`` logits (meta tensors)."""
    def meta(*shape: int, dt: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.empty(*shape, dtype=dt, device="meta")

    f = meta(batch)
    with aot.recording_launches(S, KERNELS) as log:
        S.fused_sample(meta(batch, vocab, dt=dtype), f, f, f, f, meta(batch, dt=torch.int64),
                       meta(batch, dt=torch.int64))
    return log


def main() -> int:
    for dtype in (torch.float32, torch.bfloat16):
        for batch, vocab in ((1, 32000), (64, 128256), (8, 37)):
            for launch in record_launches(batch, vocab, dtype):
                c = aot.compile_launch(S, launch)
                print(f"{launch.kernel} {str(dtype)[6:]:8s} b={batch} V={vocab} "
                      f"grid={launch.grid} {aot.describe(c)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
