"""Compile the launches ``elementwise_triton`` makes for real model shapes to sm_90 cubins on a
machine without a GPU (Triton ships ptxas), and report registers, spills and shared memory:
proof that the fused norm / rotary / SiLU*up kernels build for Hopper with the chosen blocks.

``python -m loraplex.ops.elementwise_aot`` (must run without ``TRITON_INTERPRET``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loraplex.ops import elementwise_triton as E
from loraplex.ops.lora_triton_aot import Launch, _resource_usage

KERNELS = ("_rms_norm_kernel", "_rotary_kernel", "_silu_mul_kernel")
# (name, hidden, heads, kv heads, head dim, intermediate): Llama-3.2-1B, Llama-3.1-8B, an odd one
SHAPES = (("llama-1b", 2048, 32, 8, 64, 8192), ("llama-8b", 4096, 32, 8, 128, 14336),
          ("odd", 1000, 7, 1, 96, 2500))


@contextlib.contextmanager
def recording_launches() -> Iterator[list[Launch]]:
    """Within the block, the elementwise kernels' launches are recorded instead of run."""
    log: list[Launch] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: log.append(Launch(self.name, tuple(grid), args, kwargs))

    originals = {name: getattr(E, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(E, name, Recorder(name))
        yield log
    finally:
        for name, fn in originals.items():
            setattr(E, name, fn)


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


def compile_launch(launch: Launch, arch: int = 90) -> dict:
    """Specialize ``launch`` as the JIT would and compile it for ``sm_<arch>``."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    fn = getattr(E, launch.kernel)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("kernels are interpreted (TRITON_INTERPRET=1): cannot compile them")
    kwargs = dict(launch.kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    values = list(launch.args) + [kwargs[p.name] for p in fn.params[len(launch.args):]]
    signature, constexprs, attrs = {}, {}, {}
    for i, (param, value) in enumerate(zip(fn.params, values, strict=True)):
        if param.is_constexpr:
            ty, key = "constexpr", value
        else:
            ty, key = native_specialize_impl(CUDABackend, value, False, True, True)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = key
        elif isinstance(key, str):
            attrs[(i,)] = CUDABackend.parse_attr(key)
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    regs, spills = _resource_usage(kernel.asm.get("cubin"))
    named = {fn.params[i[0]].name: v for i, v in constexprs.items()}
    return dict(constexprs=named, registers=regs, stack=spills, smem=kernel.metadata.shared)


def main() -> int:
    seen: set[tuple] = set()
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for name, *shape in SHAPES:
            for launch in record_launches(4, *shape, dtype):
                key = (launch.kernel, dtype, tuple(sorted(launch.kwargs.items())))
                if key in seen:
                    continue
                seen.add(key)
                c = compile_launch(launch)
                print(f"{launch.kernel:17s} {str(dtype)[6:]:8s} {name:8s} grid={launch.grid} "
                      f"{c['constexprs']} regs={c['registers']} stack={c['stack']} "
                      f"smem={c['smem']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
