"""The ``"cpu"`` LoRA backend: float32 shrink/expand in C (``lora_cpu.c``), one OpenMP
parallel region per call; an AVX-512 shrink kernel where the CPU has it, BLAS GEMMs
otherwise. Same signatures and semantics as ``lora_ref``; what ``"auto"`` picks on CPU when
the C library builds (``native_build``), else the engine runs ``lora_torch``.

Why a C loop rather than ``lora_torch``'s loop of ``addmm_`` calls: at two threads each of
those small GEMMs forks and joins the whole thread team, and a call costs a few microseconds
of dispatch, as much as a decode-sized GEMM. Here one call forks once; each thread runs
whole single-threaded GEMMs on its share of the batch's rows: torch's own BLAS ``sgemm_``,
and for the shrink on CPUs with AVX-512 the library's kernel (6 x 4 blocks of dot products:
the BLAS GEMM is slow at 16-48 output columns).
The rows are cut into work items: each segment (one adapter's rows) in chunks of at most
``chunk`` rows, so one long segment still feeds every thread. The items are cut once per
forward, vectorised with numpy, and reused by every projection.

Each call is lean on the host: a weight pool's C arguments (pointers, shapes, ranks,
scalings, slice offsets) are checked and made once per pool and kept (``_pool_args``), and
the work items carry their own pointer, so a call checks only its activations' layout and
makes one ``ctypes`` call. Why: these calls run right after the base GEMM, which has evicted
the caches, and each line of Python or torch dispatch then runs from memory
(``benchmarks/bench_cpu_parts.py`` part (i) times an op there against the bare C call).

Anything the C code does not cover runs ``lora_torch`` instead, with the same results:
other dtypes (bfloat16, float16), ranks held on an accelerator, a layout without unit
column stride. DoRA's column scaling (``col_scales``) is applied per flagged segment first,
as in ``lora_torch``; the delta is then added by the C expand.
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
import weakref
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from loraplex.ops import elementwise, lora_torch
from loraplex.ops.lora_meta import ColumnScales, LoRABatch
from loraplex.ops.native_build import NativeBuildError, load_library

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_INT = ctypes.c_int
_SHRINK_ARGS = [_PTR, _INT, _INT, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64, _PTR,
                _I64]
_EXPAND_ARGS = [_PTR, _INT, _INT, _PTR, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _PTR, _I64,
                _PTR, _I64]
_FUSED_ARGS = [_PTR, _INT, _PTR, _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _PTR,
               _I64, _PTR, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _INT]
_SILU_MUL_ARGS = [_INT, _PTR, _I64, _I64, _I64, _PTR, _I64]
_ROTARY_ARGS = [_PTR, _INT, _INT, _PTR, _I64, _I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR,
                _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR]
_NORM_ARGS = [_PTR, _INT, _INT, _PTR, _I64, _PTR, _I64, _PTR, ctypes.c_float, _I64, _I64, _PTR,
              _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _PTR, _I64, _I64,
              _PTR, _I64]
MIN_CHUNK = 32  # rows: below this a GEMM's packing of its weights costs more than it splits


class _Native:
    def __init__(self) -> None:
        lib = load_library(Path(__file__).with_name("lora_cpu.c"))
        blas = _torch_blas()
        if not hasattr(blas, "sgemm_"):
            raise NativeBuildError("torch's CPU library exports no BLAS sgemm_")
        self.sgemm = ctypes.cast(blas.sgemm_, ctypes.c_void_p)
        self.shrink, self.expand = lib.lp_shrink_f32, lib.lp_expand_f32
        # 1: the AVX-512 shrink and expand kernels where the CPU has them (``lp_simd_level``),
        # 0: BLAS GEMMs only (tests run both)
        self.simd = lib.lp_simd_level()
        self.shrink.argtypes, self.shrink.restype = _SHRINK_ARGS, None
        self.expand.argtypes, self.expand.restype = _EXPAND_ARGS, None
        self.expand_silu_mul = lib.lp_expand_silu_mul_f32
        self.expand_silu_mul.argtypes, self.expand_silu_mul.restype = _FUSED_ARGS, ctypes.c_int
        self.scratch_floats = lib.lp_fused_scratch_floats
        self.scratch_floats.argtypes, self.scratch_floats.restype = [_I64, _I64], _I64
        self.local = threading.local()  # .scratch: lp_expand_silu_mul_f32's, per caller thread
        self.silu_mul = lib.lp_silu_mul_f32
        self.silu_mul.argtypes, self.silu_mul.restype = _SILU_MUL_ARGS, ctypes.c_int
        self.add_rms_norm = lib.lp_add_rms_norm_f32
        self.add_rms_norm.argtypes, self.add_rms_norm.restype = _NORM_ARGS, ctypes.c_int
        self.rotary = lib.lp_rotary_f32
        self.rotary.argtypes, self.rotary.restype = _ROTARY_ARGS, ctypes.c_int


def _torch_blas() -> ctypes.CDLL:
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        if (lib_dir / name).exists():
            return ctypes.CDLL(str(lib_dir / name))
    raise NativeBuildError(f"torch's CPU library is not in {lib_dir}")


@functools.cache
def _native() -> _Native | str:
    """The loaded library, or why it is unavailable (built once per process)."""
    try:
        return _Native()
    except NativeBuildError as e:
        return str(e)


def unavailable_reason() -> str | None:
    """None when the ``"cpu"`` backend can run here, else why not (compiler output...)."""
    lib = _native()
    return lib if isinstance(lib, str) else None


def lora_shrink(
    x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, batch: LoRABatch, out: torch.Tensor
) -> None:
    """``out[seg, i*R : i*R + r] = x[seg] @ a[slot, i*R : i*R + r].T`` per segment and slice
    (contract: ``lora_ref.lora_shrink``)."""
    lib, pool = _native(), _pool_args(a, ranks)
    if pool is None or isinstance(lib, str) or not _rows_fit(x, out):
        return lora_torch.lora_shrink(x, a, ranks, batch, out)
    items = _work_items(batch)
    if items.count:
        lib.shrink(lib.sgemm, lib.simd, torch.get_num_threads(), x.data_ptr(), x.stride(0),
                   *pool, items.ptr, items.count, out.data_ptr(), out.stride(0))


def lora_expand(
    h: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    offsets: tuple[int, ...],
    batch: LoRABatch,
    y: torch.Tensor,
    col_scales: ColumnScales | None = None,
) -> None:
    """``y[seg, cols_i] += scalings[slot, i] * h[seg, i*R : i*R + r] @ b[slot, cols_i, :r].T``
    per segment and slice, in place (contract: ``lora_ref.lora_expand``)."""
    lib, pool = _native(), _pool_args(b, ranks, scalings, offsets)
    if pool is None or isinstance(lib, str) or not _rows_fit(h, y):
        return lora_torch.lora_expand(h, b, ranks, scalings, offsets, batch, y, col_scales)
    assert offsets[-1] == y.shape[1], (offsets, y.shape)
    items = _work_items(batch)
    if not items.count:
        return
    if col_scales is not None and any(col_scales.host_flags):
        _scale_flagged(col_scales, ranks, offsets, batch, y)
    lib.expand(lib.sgemm, lib.simd, torch.get_num_threads(), h.data_ptr(), h.stride(0), *pool,
               items.ptr, items.count, y.data_ptr(), y.stride(0))


def lora_expand_silu_mul(
    h: torch.Tensor,
    b: torch.Tensor,
    ranks: torch.Tensor,
    scalings: torch.Tensor,
    offsets: tuple[int, ...],
    batch: LoRABatch,
    y: torch.Tensor,
    col_scales: ColumnScales | None = None,
    then: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """``silu(gate) * up`` of a gate/up projection's base output ``y`` ``[T, 2I]`` (gate
    columns first) with its LoRA delta added on the way: ``lora_expand`` into ``y`` followed by
    ``elementwise.cpu_silu_mul``, without adding the delta to ``y`` (the expand's read and
    rewrite of the layer's largest activation is gone: the delta is made a block of rows at a
    time, in registers or a small scratch, and the activation reads ``y`` once; only DoRA
    slots still rescale their own rows of ``y`` first, as ``lora_expand`` does).

    ``then = (a2, ranks2, h2)``: also the next projection's shrink of the result (the MLP's
    down projection), ``lora_shrink(out, a2, ranks2, batch, h2)``, run on each block of rows
    right after the activation wrote it, while it is still in cache (``[T, I]`` is read from
    memory otherwise, the largest input of any shrink).

    Returns the new ``[T, I]`` tensor, or None where this does not run (the caller then runs
    ``lora_expand``, the activation and the shrink apart): where ``cpu_silu_mul`` does not (no
    C library, no AVX-512, not float32, disabled), for slices other than two equal halves, or
    for a ``then`` the C code does not take. Rows without an adapter get exactly
    ``cpu_silu_mul``'s values."""
    lib, pool = _native(), _pool_args(b, ranks, scalings, offsets)
    if (pool is None or isinstance(lib, str) or not lib.simd or len(offsets) != 3
            or offsets[2] != 2 * offsets[1] or not _rows_fit(h, y) or not elementwise.enabled()):
        return None
    inter, t = offsets[1], y.shape[0]
    down = (0, 0, 0, 0, 0, 0, 0)  # then's C arguments: none
    if then is not None:
        a2, ranks2, h2 = then
        down_pool = _pool_args(a2, ranks2)
        if down_pool is None or a2.shape[2] != inter or not _rows_fit(h2):
            return None
        a2_ptr, n_r2, _, ranks2_ptr, n2, big_r2 = down_pool  # (in = inter, checked above)
        down = (a2_ptr, n_r2, ranks2_ptr, n2, big_r2, h2.data_ptr(), h2.stride(0))
    out = torch.empty(t, inter)
    items = _activation_items(batch, t)
    if col_scales is not None and any(col_scales.host_flags):
        _scale_flagged(col_scales, ranks, offsets, batch, y)  # DoRA: y's own rows, first
    threads = torch.get_num_threads()
    scratch = _scratch(lib, threads * lib.scratch_floats(inter, b.shape[2]))
    if items.count and lib.expand_silu_mul(
            lib.sgemm, threads, h.data_ptr(), h.stride(0), b.data_ptr(), inter, b.shape[2],
            pool[3], pool[4], items.ptr, items.count, y.data_ptr(), y.stride(0),
            out.data_ptr(), out.stride(0), scratch.data_ptr(), *down, lib.simd) != 0:
        raise RuntimeError("lp_expand_silu_mul_f32 found no AVX-512 (lp_simd_level said so)")
    return out


def lora_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    batch: LoRABatch | None,
    before: tuple | None = None,
    then: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """RMSNorm of ``x + residual`` (of ``x`` without one) in C, as a new tensor, the sum
    written into ``x`` (``RMSNorm.add_forward``'s contract). ``batch`` None: the norm alone
    (``elementwise.cpu_rms_norm``, the base model's). With a LoRA batch, the LoRA work on
    either side of it is done in the same pass over each block of rows:

    - ``before = (h, b, ranks, scalings, offsets, col_scales)``: first the expand of the
      projection that wrote ``x`` (one slice: the attention's o or the MLP's down),
      ``lora_expand(h, b, ranks, scalings, offsets, batch, x, col_scales)``, on rows the add
      and the norm then read from cache (unfused, the expand reads and rewrites all of ``x``
      only for the add to read it again);
    - ``then = (a2, ranks2, h2)``: after it the shrink of the projection that reads the
      result (the next qkv or gate/up), ``lora_shrink(out, a2, ranks2, batch, h2)``, on each
      block of rows the norm just wrote.

    Returns the new ``[T, hidden]`` tensor, or None, having written nothing, where this does
    not run (not CPU float32 rows with unit column stride and a float32 weight, no C library
    or no AVX-512 here, fused kernels disabled, an expand of more than one slice, or
    arguments the C code does not take): the caller then runs torch's norm, or the expand, the
    norm and the shrink apart. Rows without an adapter get exactly the norm alone's values."""
    lib = _native()
    if (isinstance(lib, str) or not lib.simd or not elementwise.enabled() or x.dim() != 2
            or weight.shape != x.shape[1:] or not _rows_fit(x, weight)
            or (residual is not None and (residual.shape != x.shape or not _rows_fit(residual)))):
        return None
    assert batch is not None or (before is None and then is None), "LoRA work needs a batch"
    t, hidden = x.shape
    expand = (None, 0, None, 0, None, None)
    if before is not None:
        h, b, ranks, scalings, offsets, col_scales = before
        pool = _pool_args(b, ranks, scalings, offsets)
        if pool is None or len(offsets) != 2 or b.shape[1] != hidden or not _rows_fit(h):
            return None
        expand = (h.data_ptr(), h.stride(0), pool[0], pool[2], pool[3], pool[4])
    shrink = (None, 0, None, 0, 0, None, 0)
    if then is not None:
        a2, ranks2, h2 = then
        pool = _pool_args(a2, ranks2)
        if pool is None or a2.shape[2] != hidden or not _rows_fit(h2):
            return None
        a2_ptr, n_r2, _, ranks2_ptr, n2, big_r2 = pool
        shrink = (a2_ptr, n_r2, ranks2_ptr, n2, big_r2, h2.data_ptr(), h2.stride(0))
    if before is not None and col_scales is not None and any(col_scales.host_flags):
        _scale_flagged(col_scales, ranks, offsets, batch, x)  # DoRA: x's own rows, first
    items = (_activation_items(batch, t)[1:] if batch is not None  # (pointer, count)
             else (None, 0))  # the norm alone, over all rows
    res = (residual.data_ptr(), residual.stride(0)) if residual is not None else (None, 0)
    out = torch.empty(t, hidden)
    if lib.add_rms_norm(lib.sgemm, torch.get_num_threads(), lib.simd, x.data_ptr(), x.stride(0),
                        *res, weight.data_ptr(), eps, hidden, t, out.data_ptr(), out.stride(0),
                        *items, *expand, *shrink) != 0:
        raise RuntimeError("lp_add_rms_norm_f32 found no AVX-512 (lp_simd_level said so)")
    return out


def lora_rotary_(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    batch: LoRABatch | None,
    before: tuple | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Rotary embedding of ``x [T, heads, d]`` in place, ``x * cos + rotate_half(x) * sin``
    with ``cos``/``sin`` one row of ``d`` per row of ``x`` (``[T, 1, d]`` or ``[T, d]``): bit
    for bit ``RotaryEmbedding.rotate``'s values (each product rounded, then the sum). Returns
    ``x``. ``batch`` None: the rotary alone (``elementwise.cpu_rotary_``, the base model's).

    ``before = (h, b, ranks, scalings, offsets, col_scales)``: first the expand of the
    projection whose output ``y`` ``x`` is a view of (the qkv projection: ``x`` its q and k
    heads, ``y``'s first columns of the same rows),
    ``lora_expand(h, b, ranks, scalings, offsets, batch, y, col_scales)``, a block of rows at
    a time that the rotary then reads from cache (unfused, the expand reads and rewrites all
    of ``y`` first). The rows' columns past ``x``'s heads (v) get their delta too.

    Returns None, having written nothing, where this does not run (not CPU float32 with unit
    last stride and an even ``d``, tables of another shape, no C library or no AVX-512 here,
    fused kernels disabled, or an expand the C code does not take): the caller then runs the
    expand and torch's rotary apart."""
    lib = _native()
    if (isinstance(lib, str) or not lib.simd or not elementwise.enabled() or x.dim() != 3
            or x.shape[2] % 2 or not _rows_fit(x)):
        return None
    t, heads, d = x.shape
    tables = [_table_stride(c, t, d) for c in (cos, sin)]
    if None in tables:
        return None
    assert batch is not None or before is None, "LoRA work needs a batch"
    assert (before is None) == (y is None), "the expand needs the output it adds to"
    expand = (None, 0, None, 0, None, 0, 0, None, None, 0, None)
    if before is not None:
        h, b, ranks, scalings, offsets, col_scales = before
        pool = _pool_args(b, ranks, scalings, offsets)
        if (pool is None or not _rows_fit(h, y) or y.dim() != 2 or y.shape[0] != t
                or y.data_ptr() != x.data_ptr() or offsets[-1] != y.shape[1]
                or (t > 1 and y.stride(0) != x.stride(0))):
            return None
        expand = (y.data_ptr(), y.stride(0), h.data_ptr(), h.stride(0), *pool)
        if col_scales is not None and any(col_scales.host_flags):  # DoRA: y's own rows, first
            _scale_flagged(col_scales, ranks, offsets, batch, y)
    items = (_activation_items(batch, t)[1:] if batch is not None  # (pointer, count)
             else (None, 0))  # the rotary alone, over all rows
    if t and lib.rotary(lib.sgemm, lib.simd, torch.get_num_threads(), x.data_ptr(),
                        x.stride(0), heads, x.stride(1), d, t, cos.data_ptr(), tables[0],
                        sin.data_ptr(), tables[1], *items, *expand) != 0:
        raise RuntimeError("lp_rotary_f32 found no AVX-512 (lp_simd_level said so)")
    return x


def _table_stride(c: torch.Tensor, t: int, d: int) -> int | None:
    """The row stride of a rotary table with one float32 row of ``d`` per token (``[T, 1, d]``
    or ``[T, d]``, unit last stride, on the host), else None."""
    if (c.dtype is not torch.float32 or not c.is_cpu or c.shape[0] != t or c.shape[-1] != d
            or c.numel() != t * d or c.stride(-1) != 1):
        return None
    return c.stride(0)


def _scratch(lib: _Native, numel: int) -> torch.Tensor:
    """The fused op's scratch for this calling thread (engines in two threads of one process
    never share it), allocated once and grown when a call needs more: no allocation per call."""
    buf = getattr(lib.local, "scratch", None)
    if buf is None or buf.numel() < numel:
        buf = lib.local.scratch = torch.empty(numel)
    return buf


def _rows_fit(*rows: torch.Tensor) -> bool:
    """The C code's layout for activations: float32 on the host, unit column stride (any row
    stride)."""
    return all(t.dtype is torch.float32 and t.is_cpu and t.stride(-1) == 1 for t in rows)


# id(weight pool) -> (weak references to the pool, ranks, scalings; offsets; C arguments;
# the offsets array those arguments point into)
_POOLS: dict[int, tuple] = {}


def _no_ref() -> None:  # the "weak reference" of an absent tensor (a shrink's scalings)
    return None


def _pool_args(pool: torch.Tensor, ranks: torch.Tensor, scalings: torch.Tensor | None = None,
               offsets: tuple[int, ...] | None = None) -> tuple | None:
    """The C functions' arguments for a weight pool: for a shrink's ``a [S, n*R, in]`` with
    its ranks ``(a, n*R, in, ranks, n, R)``, for an expand's ``b [S, out, R]`` with its ranks,
    scalings and slice offsets ``(b, out, R, ranks, scalings, n, offsets)``; None where the C
    code does not take them (not contiguous float32 on the host, ranks not host int32). Made
    once per pool and kept while the same pool, ranks, scalings and offsets objects come back
    (an engine's pools live as long as it does); the references are weak, so a dead engine's
    pools are not held."""
    hit = _POOLS.get(id(pool))
    if (hit is not None and hit[0]() is pool and hit[1]() is ranks
            and hit[2]() is scalings and hit[3] == offsets
            and (hit[4] is None or hit[4][0] == pool.data_ptr())):  # storage not swapped
        return hit[4]
    args, offs = None, None

    def f32_host(t: torch.Tensor) -> bool:
        return t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()

    if (f32_host(pool) and ranks.device.type == "cpu" and ranks.dtype == torch.int32
            and ranks.is_contiguous() and (scalings is None or f32_host(scalings))):
        n = ranks.shape[1]
        if scalings is None:
            args = (pool.data_ptr(), pool.shape[1], pool.shape[2], ranks.data_ptr(), n,
                    pool.shape[1] // n)
        else:
            assert len(offsets) == n + 1, (offsets, n)
            offs = np.asarray(offsets, dtype=np.int64)
            args = (pool.data_ptr(), pool.shape[1], pool.shape[2], ranks.data_ptr(),
                    scalings.data_ptr(), n, offs.ctypes.data)
    if len(_POOLS) > 4096:  # dead pools' entries: drop them now and then
        for key in [k for k, v in _POOLS.items() if v[0]() is None]:
            del _POOLS[key]
    keep = weakref.ref(scalings) if scalings is not None else _no_ref
    _POOLS[id(pool)] = (weakref.ref(pool), weakref.ref(ranks), keep, offsets, args, offs)
    return args


class Items(NamedTuple):
    """A batch's rows as the C functions' work items."""

    array: np.ndarray  # [count, 3] int64 (first row, rows, slot)
    ptr: int  # array's address
    count: int


def _items(array: np.ndarray) -> Items:
    array = np.ascontiguousarray(array, dtype=np.int64)
    return Items(array, array.ctypes.data, len(array))


def _work_items(batch: LoRABatch) -> Items:
    """The batch's adapter segments, each cut into chunks of at most ``max(MIN_CHUNK, rows /
    (4 * threads))`` rows, so there are about four items per thread (dynamic scheduling evens
    out unequal segments). Cached on the batch with the ``host_segs`` list it was cut from."""
    cached = batch.work_items
    if cached is not None and cached[0] is batch.host_segs:
        return cached[1]
    items = _items(_cut(np.asarray(batch.host_segs, dtype=np.int64).reshape(-1, 3)))
    batch.work_items = (batch.host_segs, items)
    return items


def _activation_items(batch: LoRABatch, t: int) -> Items:
    """``_work_items`` plus the runs of the first ``t`` rows that no segment covers, as
    ``(first row, rows, -1)`` items cut the same way: every row of the activation once.
    Cached on the batch with the ``host_segs`` list and ``t`` it was made for."""
    cached = batch.activation_items
    if cached is not None and cached[0] is batch.host_segs and cached[1] == t:
        return cached[2]
    gaps, pos = [], 0
    for start, length, _ in batch.host_segs:
        if start > pos:
            gaps.append((pos, start - pos, -1))
        pos = start + length
    if pos < t:
        gaps.append((pos, t - pos, -1))
    array = _work_items(batch).array
    if gaps:
        array = np.concatenate([array, _cut(np.asarray(gaps, dtype=np.int64))])
    items = _items(array)
    batch.activation_items = (batch.host_segs, t, items)
    return items


def _cut(segs: np.ndarray) -> np.ndarray:
    """``segs [k, 3]`` (start, rows, slot) cut into chunks (see ``_work_items``), vectorised."""
    threads = torch.get_num_threads()
    total = int(segs[:, 1].sum())
    chunk = max(MIN_CHUNK, math.ceil(total / (4 * threads))) if threads > 1 else max(total, 1)
    pieces = (segs[:, 1] + chunk - 1) // chunk  # chunks per segment
    seg_of = np.repeat(np.arange(len(segs)), pieces)
    first = np.arange(len(seg_of)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    starts = segs[seg_of, 0] + first * chunk
    lens = np.minimum(chunk, segs[seg_of, 1] - first * chunk)
    return np.ascontiguousarray(np.stack([starts, lens, segs[seg_of, 2]], axis=1))


def _scale_flagged(cs: ColumnScales, ranks: torch.Tensor, offsets: tuple[int, ...],
                   batch: LoRABatch, y: torch.Tensor) -> None:
    """DoRA: a flagged slot's rows first map their base output ``y * scale + shift`` on the
    slices it adapts (rank > 0), as ``lora_torch.lora_expand`` does before its GEMM."""
    host_ranks = ranks.numpy()
    for start, length, slot in batch.host_segs:
        if not cs.host_flags[slot]:
            continue
        rows = y[start : start + length]
        for i, r in enumerate(host_ranks[slot].tolist()):
            if r:
                lora_torch.scale_columns(rows[:, offsets[i] : offsets[i + 1]], cs, slot,
                                         offsets[i], offsets[i + 1])

