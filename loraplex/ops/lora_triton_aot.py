"""Compile the exact Triton launches the LoRA op wrappers would make, for a GPU target,
on a machine without a GPU (ptxas ships with Triton). CI and the benchmark's dry run use it to
prove the kernels build for Hopper with the block sizes chosen for real shapes, and to report
registers, spills and shared memory per launch.

Usage: call the wrappers on ``meta`` tensors of the real shapes inside ``recording_launches()``,
then ``compile_launches(recorded)``. Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from loraplex.ops import lora_triton
from loraplex.ops import lora_triton_kernels as K
from loraplex.ops import triton_aot as aot
from loraplex.ops.lora_meta import ColumnScales, LoRABatch
from loraplex.ops.triton_aot import CompiledLaunch, Launch

KERNELS = ("shrink_segment_kernel", "shrink_decode_kernel", "expand_segment_kernel",
           "expand_decode_kernel")


@dataclass(frozen=True)
class OpShape:
    """One projection's LoRA work: ``in_features -> sum(widths)`` in ``len(widths)`` slices,
    every slot at ``rank``, ``num_tokens`` tokens over ``num_adapters`` adapters: round-robin
    per token (decode) or, with ``seg_len``, contiguous segments of that length (prefill)."""

    name: str
    in_features: int
    widths: tuple[int, ...]
    rank: int
    num_tokens: int
    num_adapters: int = 32
    seg_len: int | None = None
    dtype: torch.dtype = torch.bfloat16

    def token_lora_slots(self) -> list[int]:
        if self.seg_len is None:
            return [i % self.num_adapters for i in range(self.num_tokens)]
        return [(i // self.seg_len) % self.num_adapters for i in range(self.num_tokens)]


def target_shapes(ranks: tuple[int, ...] = (16, 64),
                  decode_tokens: tuple[int, ...] = (1, 8, 32, 128)) -> list[OpShape]:
    """Llama-3-8B projections (hidden 4096; q/k/v 4096+1024+1024 with 8 kv heads of 128;
    down 14336 -> 4096), decode batches and a 4096-token prefill of 32 x 128 tokens."""
    projs = [("qkv", 4096, (4096, 1024, 1024)), ("down", 14336, (4096,))]
    shapes = []
    for rank in ranks:
        for name, k, widths in projs:
            shapes += [OpShape(f"{name} r={rank} decode {t}", k, widths, rank, t)
                       for t in decode_tokens]
            shapes.append(OpShape(f"{name} r={rank} prefill 4096", k, widths, rank, 4096,
                                  seg_len=128))
    return shapes


def record_op_launches(shape: OpShape) -> list[Launch]:
    """The launches ``lora_shrink`` + ``lora_expand`` make for ``shape`` (meta tensors)."""
    meta = dict(dtype=shape.dtype, device="meta")
    n, r, t, s = len(shape.widths), shape.rank, shape.num_tokens, shape.num_adapters
    out = sum(shape.widths)
    offsets = tuple(sum(shape.widths[:i]) for i in range(n + 1))
    x, h, y = (torch.empty(t, shape.in_features, **meta), torch.empty(t, n * r, **meta),
               torch.empty(t, out, **meta))
    a, b = torch.empty(s, n * r, shape.in_features, **meta), torch.empty(s, out, r, **meta)
    ranks = torch.empty(s, n, dtype=torch.int32, device="meta")
    scalings = torch.empty(s, n, dtype=torch.float32, device="meta")
    batch = LoRABatch.from_token_slots(shape.token_lora_slots(), device="meta")
    # the engine always passes the slots' column scales (DoRA's epilogue is compiled in)
    f32 = dict(dtype=torch.float32, device="meta")
    col_scales = ColumnScales(torch.empty(s, out, **f32), torch.empty(s, out, **f32),
                              torch.empty(s, dtype=torch.int32, device="meta"), [False] * s)
    with recording_launches() as log:
        lora_triton.lora_shrink(x, a, ranks, batch, h)
        lora_triton.lora_expand(h, b, ranks, scalings, offsets, batch, y, col_scales)
    return log


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Within the block, the LoRA kernels' launches are recorded instead of run."""
    with aot.recording_launches(K, KERNELS) as log:
        yield log


def compile_launch(launch: Launch, arch: int = 90) -> CompiledLaunch:
    return aot.compile_launch(K, launch, arch)


def compile_launches(launches: list[Launch], arch: int = 90) -> list[CompiledLaunch]:
    return [compile_launch(x, arch) for x in launches]


def main() -> int:
    """Compile every launch of ``target_shapes()`` (bf16) plus fp16/fp32 variants for sm_90;
    print registers/spills/shared memory per distinct kernel configuration."""
    shapes = target_shapes()
    shapes += [OpShape(f"qkv r=16 {dt} {kind}", 512, (256, 64, 64), 16, t, 8, seg, dt)
               for dt in (torch.float16, torch.float32)
               for kind, t, seg in (("decode", 32, None), ("prefill", 512, 64))]
    seen: dict[tuple, str] = {}
    for shape in shapes:
        for launch in record_op_launches(shape):
            key = (launch.kernel, shape.dtype, tuple(sorted(launch.kwargs.items())))
            if key in seen:
                continue
            seen[key] = shape.name
            c = compile_launch(launch)
            print(f"{launch.kernel:22s} {str(shape.dtype):15s} {c.constexprs} "
                  f"warps={launch.kwargs.get('num_warps')} stages={launch.kwargs.get('num_stages')}"
                  f" regs={c.registers} stack={c.spill_bytes} smem={c.shared_bytes}"
                  f"  (first: {shape.name}, grid {launch.grid})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
