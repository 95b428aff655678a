"""Compile recorded Triton launches for a GPU target on a machine without a GPU (Triton ships
ptxas and cuobjdump), and report registers, spills and shared memory per launch.

The kernel families' ``*_aot`` modules call their op wrappers on ``meta`` tensors of real
shapes inside ``recording_launches(module, names)``, so the exact grids, constexprs and
options the wrappers pick are captured without running anything, then ``compile_launch``
builds each for ``sm_<arch>``. Must run without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_OPTIONS = ("num_warps", "num_stages")


@dataclass
class Launch:
    kernel: str
    grid: tuple[int, ...]
    args: tuple
    kwargs: dict


@dataclass
class CompiledLaunch:
    launch: Launch
    constexprs: dict
    shared_bytes: int
    registers: int | None  # from cuobjdump; None if unavailable
    spill_bytes: int | None


class _Recorder:
    def __init__(self, name: str, log: list[Launch]) -> None:
        self.name, self.log = name, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.log.append(Launch(self.name, tuple(grid), args, dict(kwargs)))

        return launch


@contextlib.contextmanager
def recording_launches(module: ModuleType, names: tuple[str, ...]) -> Iterator[list[Launch]]:
    """Within the block, launches of ``module``'s kernels ``names`` are recorded, not run."""
    originals = {name: getattr(module, name) for name in names}
    log: list[Launch] = []
    try:
        for name in names:
            setattr(module, name, _Recorder(name, log))
        yield log
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


def compile_launch(module: ModuleType, launch: Launch, arch: int = 90) -> CompiledLaunch:
    """Specialize ``launch`` of ``module``'s kernel the way the JIT would (dtypes,
    16-divisibility, ints == 1) and compile it to a cubin for ``sm_<arch>``."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    fn = getattr(module, launch.kernel)
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("kernels are interpreted (TRITON_INTERPRET=1): cannot compile them")
    kwargs = dict(launch.kwargs)
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
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
    return CompiledLaunch(launch, named, kernel.metadata.shared, regs, spills)


def describe(c: CompiledLaunch) -> str:
    """One report line's resource part."""
    return (f"{c.constexprs} regs={c.registers} stack={c.spill_bytes} smem={c.shared_bytes}")


def _resource_usage(cubin: bytes | None) -> tuple[int | None, int | None]:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not cubin or not tool.exists():
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            text = subprocess.run([str(tool), "--dump-resource-usage", f.name],
                                  capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None, None
    regs = re.search(r"REG:(\d+)", text)
    spill = re.search(r"STACK:(\d+)", text)
    return (int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else None)
