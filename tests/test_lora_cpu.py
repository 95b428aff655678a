"""The ``"cpu"`` LoRA backend (``ops/lora_cpu.py`` over ``ops/lora_cpu.c``) beyond the op sweeps
of test_lora_ops.py / test_dora_ops.py (which run it against the naive oracle): it really
runs the C code for float32 and the torch code otherwise, its work items cover the segments
exactly and feed every thread, the library builds once and is cached, and a machine where it
cannot build falls back to the torch backend with the reason."""

from __future__ import annotations

import os
import random
import shutil
import sys

import numpy as np
import pytest
import torch

from loraplex.ops import lora_cpu, lora_torch, native_build, resolve_lora_backend
from loraplex.ops.elementwise import cpu_silu_mul
from loraplex.ops.lora_meta import LoRABatch
from loraplex.ops.lora_testing import build, check_expand, check_shrink, naive_expand, poisoned_h

CAN_BUILD = sys.platform.startswith("linux") and shutil.which("cc") is not None
needs_build = pytest.mark.skipif(not CAN_BUILD, reason="needs Linux and a C compiler")


@needs_build
def test_builds_on_linux_with_a_compiler() -> None:
    assert lora_cpu.unavailable_reason() is None
    assert resolve_lora_backend("auto", "cpu") == "cpu"


@pytest.fixture(params=["simd", "blas"])
def kernels(request, monkeypatch):
    """Both code paths of the C library: its AVX-512 shrink and expand kernels (where this CPU
    has them) and torch's BLAS GEMM (what CPUs without AVX-512 run)."""
    if not CAN_BUILD:
        pytest.skip("needs Linux and a C compiler")
    lib = lora_cpu._native()
    if request.param == "simd" and not lib.simd:
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setattr(lib, "simd", int(request.param == "simd"))
    return request.param


@pytest.mark.parametrize("threads", [1, 2])
def test_float32_runs_the_c_code(monkeypatch, kernels: str, threads: int) -> None:
    """No float32 call reaches the torch code; the results match the oracle (sweeps: rows
    past 4-row blocks, ranks past 4-column blocks and 16-wide vectors, inputs past 16-wide
    vectors, per-slice ranks incl. 0, one and three slices)."""
    def refuse(*args, **kwargs):
        raise AssertionError("float32 fell back to the torch backend")

    monkeypatch.setattr(lora_torch, "lora_shrink", refuse)
    monkeypatch.setattr(lora_torch, "lora_expand", refuse)
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for n, num_tokens, max_rank, pattern in [(3, 300, 16, "distinct"), (3, 300, 16, "zipf"),
                                                 (1, 7, 5, "some_none"), (2, 1, 64, "same"),
                                                 (3, 2, 3, "distinct"), (2, 133, 40, "zipf")]:
            case = build(n, num_tokens, pattern, max_rank, seed=num_tokens + max_rank)
            check_shrink(lora_cpu.lora_shrink, case, rtol=1e-5, atol=1e-5)
            check_expand(lora_cpu.lora_expand, case, rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(saved)


def test_kernels_at_engine_shapes(kernels: str) -> None:
    """Shapes the kernels' blocking meets in a model (hidden 1024, uneven widths, 128-row
    segments, ranks 16 and 300), against float64 matmuls."""
    g = torch.Generator().manual_seed(0)
    for rows, in_f, out_f, rank in [(128, 1024, 2816, 16), (37, 1000, 77, 16), (2, 96, 33, 300)]:
        x, y = torch.randn(rows, in_f, generator=g), torch.randn(rows, out_f, generator=g)
        a = torch.randn(3, rank, in_f, generator=g) / in_f ** 0.5
        b = torch.randn(3, out_f, rank, generator=g)
        ranks, scalings = torch.full((3, 1), rank, dtype=torch.int32), torch.full((3, 1), 0.5)
        batch = LoRABatch.from_token_slots([1] * rows)
        h = torch.empty(rows, rank)
        lora_cpu.lora_shrink(x, a, ranks, batch, h)
        want_h = x.double() @ a[1].double().T
        torch.testing.assert_close(h.double(), want_h, rtol=1e-4, atol=1e-4)
        y0 = y.clone()
        lora_cpu.lora_expand(h, b, ranks, scalings, (0, out_f), batch, y)
        torch.testing.assert_close(y.double(), y0.double() + 0.5 * h.double() @ b[1].double().T,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_takes_the_torch_code(monkeypatch, dtype: torch.dtype) -> None:
    calls = []
    real = lora_torch.lora_shrink
    monkeypatch.setattr(lora_torch, "lora_shrink", lambda *a: calls.append(1) or real(*a))
    case = build(2, 20, "zipf", 8, seed=3, dtype=dtype)
    check_shrink(lora_cpu.lora_shrink, case, rtol=2e-2, atol=2e-2)
    assert calls


def test_work_items_cover_the_segments_and_split_long_ones(monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    slots = [3] * 1000 + [-1] * 5 + [7] * 2 + [1] * 40
    batch = LoRABatch.from_token_slots(slots)
    items = lora_cpu._work_items(batch).array
    chunk = max(lora_cpu.MIN_CHUNK, -(-1042 // 8))  # ~4 items per thread
    assert items[:, 1].max() <= chunk and len(items) >= 8
    rows = np.full(len(slots), -1)
    for start, n, slot in items.tolist():
        assert (rows[start : start + n] == -1).all()  # no row in two items
        rows[start : start + n] = slot
    assert rows.tolist() == slots  # every adapter row once, with its slot
    assert lora_cpu._work_items(batch).array is items  # cached for the batch's other projections
    batch.host_segs = [(0, 4, 2)]  # the builder makes a new list each step: cut again
    assert lora_cpu._work_items(batch).array.tolist() == [[0, 4, 2]]


def test_one_thread_keeps_segments_whole(monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    batch = LoRABatch.from_token_slots([0] * 700 + [2] * 3)
    assert lora_cpu._work_items(batch).array.tolist() == [[0, 700, 0], [700, 3, 2]]


@needs_build
def test_library_is_built_once_and_cached(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    src = tmp_path / "k.c"
    src.write_text("int lp_answer(void) { return 42; }\n")
    lib = native_build.build_library(src)
    stamp = lib.stat().st_mtime_ns
    assert native_build.load_library(src).lp_answer() == 42
    assert native_build.build_library(src) == lib and lib.stat().st_mtime_ns == stamp
    src.write_text("int lp_answer(void) { return 7; }\n")  # a new source: a new library
    assert native_build.build_library(src) != lib
    assert native_build.load_library(src).lp_answer() == 7
    assert not list(tmp_path.glob("tmp*"))  # no temporary file left behind


@needs_build
def test_unusable_cache_dir_falls_back_to_a_private_temp_dir(tmp_path, monkeypatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")  # mkdir below it fails, even for root
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path))
    src = tmp_path / "k.c"
    src.write_text("int lp_answer(void) { return 42; }\n")
    lib = native_build.build_library(src)
    assert lib.parent == tmp_path / f"loraplex-{os.getuid()}"
    assert lib.parent.stat().st_mode & 0o777 == 0o700
    assert native_build.load_library(src).lp_answer() == 42


def test_build_failures_are_typed(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE_DIR", str(tmp_path))
    src = tmp_path / "bad.c"
    src.write_text("this is not C\n")
    if CAN_BUILD:
        with pytest.raises(native_build.NativeBuildError, match="bad.c"):
            native_build.build_library(src)
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler reachable
    monkeypatch.setattr(native_build.sysconfig, "get_config_var", lambda name: None)
    with pytest.raises(native_build.NativeBuildError, match="no C compiler"):
        native_build.build_library(src)


def test_unavailable_library_falls_back(monkeypatch) -> None:
    """"auto" picks the torch backend and says why; asking for "cpu" is an error naming it;
    the ops themselves still compute (through the torch code)."""
    monkeypatch.setattr(lora_cpu, "_native", lambda: "no C compiler found")
    assert resolve_lora_backend("auto", "cpu") == "torch"
    with pytest.raises(ValueError, match="no C compiler found"):
        resolve_lora_backend("cpu", "cpu")
    case = build(2, 30, "distinct", 8, seed=1)
    check_shrink(lora_cpu.lora_shrink, case, rtol=1e-5, atol=1e-5)
    check_expand(lora_cpu.lora_expand, case, rtol=1e-5, atol=1e-5)


def test_cpu_backend_refuses_other_devices() -> None:
    with pytest.raises(ValueError, match="lora_backend='cpu'"):
        resolve_lora_backend("cpu", "cuda")


# --- the gated MLP's activation in C, and the gate/up expand fused into it ---

needs_simd = pytest.mark.skipif(
    not CAN_BUILD or isinstance(lora_cpu._native(), str) or not lora_cpu._native().simd,
    reason="needs the C library and AVX-512")
ULP = torch.finfo(torch.float32).eps


def silu_mul64(y: torch.Tensor) -> torch.Tensor:
    g, u = y.double().chunk(2, dim=-1)
    return g / (1 + torch.exp(-g)) * u


@needs_simd
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_silu_mul_within_a_few_ulp(threads: int) -> None:
    """Against float64 over widths past 16-wide vectors and row counts past 16-row chunks,
    a column-strided input, and the values where exp under/overflows: NaN stays NaN, -inf
    gives NaN and +inf gives inf as torch's silu does."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        for rows, inter in [(1, 1), (3, 15), (17, 16), (40, 77), (5, 2816)]:
            y = torch.randn(rows, 2 * inter, generator=g) * 6
            got = cpu_silu_mul(y)
            want = silu_mul64(y)
            # the product's two roundings plus exp's error: a few ulp of each factor
            tol = 6 * ULP * want.abs() + 1e-30
            assert ((got.double() - want).abs() <= tol).all(), (rows, inter)
        wide = torch.randn(4, 64, generator=g)[:, :40]  # row stride 64: not contiguous
        torch.testing.assert_close(cpu_silu_mul(wide).double(), silu_mul64(wide), rtol=1e-6,
                                   atol=0)
        gate = torch.tensor([float("nan"), float("-inf"), float("inf"), -100.0, -88.0, 90.0,
                             0.0, -0.0, 1e-30, -103.9, 103.9, -1e30, 1e30, 3.0, -3.0, 20.0])
        up = torch.ones(16)
        got = cpu_silu_mul(torch.cat([gate, up]).view(1, 32))[0]
        want = torch.nn.functional.silu(gate)
        assert torch.equal(got.isnan(), want.isnan()), (got, want)
        ok = ~want.isnan()
        torch.testing.assert_close(got[ok], want[ok], rtol=4 * ULP, atol=1e-37)
    finally:
        torch.set_num_threads(saved)


def test_cpu_silu_mul_declines_what_it_does_not_cover(monkeypatch) -> None:
    """None (the caller runs torch's ops) off float32, for an odd width, without AVX-512 and
    with LORAPLEX_FUSED_ELEMENTWISE=0."""
    assert cpu_silu_mul(torch.randn(2, 8, dtype=torch.bfloat16)) is None
    assert cpu_silu_mul(torch.randn(2, 7)) is None
    assert cpu_silu_mul(torch.randn(8, 2).t()) is None
    monkeypatch.setenv("LORAPLEX_FUSED_ELEMENTWISE", "0")
    assert cpu_silu_mul(torch.randn(2, 8)) is None
    monkeypatch.delenv("LORAPLEX_FUSED_ELEMENTWISE")
    if CAN_BUILD and not isinstance(lora_cpu._native(), str):
        monkeypatch.setattr(lora_cpu._native(), "simd", 0)
        assert cpu_silu_mul(torch.randn(2, 8)) is None


def fused_case(pattern, num_tokens: int, inter: int, max_rank: int, seed: int):
    """A gate/up case: two slices of ``inter`` columns, random per-slot ranks incl. 0."""
    return build(2, num_tokens, pattern, max_rank, seed=seed, widths=(inter, inter))


def run_fused(case, cs=None):
    """(the fused op's output, y0, y after the call, poisoned h) on a random y."""
    t = len(case.token_lora_slots)
    y0 = torch.randn(t, case.b.shape[1], generator=torch.Generator().manual_seed(4)) * 3
    y, h = y0.clone(), poisoned_h(case)
    out = lora_cpu.lora_expand_silu_mul(h, case.b, case.ranks, case.scalings, case.offsets,
                                        case.batch, y, cs)
    return out, y0, y, h


@needs_simd
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_expand_silu_mul_equals_expand_then_activation(threads: int) -> None:
    """silu(gate + dg) * (up + du) against float64, over the mixes of test_lora_ops (base rows,
    ranks 0 on one half, partial ranks), long items (transposed-B kernel, 8/4/2-row blocks)
    and one- and two-row items (decode: BLAS delta), widths past 16-wide vectors; NaN-poisoned
    unused ranks never leak; y is not written; rows without an adapter are bit-identical to
    ``cpu_silu_mul``."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k, (pattern, tokens, inter, rank) in enumerate([
                ("distinct", 7, 33, 16), ("some_none", 40, 77, 8), ("zipf", 300, 160, 16),
                ("same", 133, 16, 64), ([0, 0, 1, -1, 2, 2, 2, 3] * 5, 40, 48, 5),
                ([3] * 61 + [-1] * 3 + [0] * 9, 73, 2816 // 8, 16)]):
            case = fused_case(pattern, tokens, inter, rank, seed=k)
            out, y0, y, h = run_fused(case)
            assert torch.equal(y, y0), "the fused op wrote y"
            want = silu_mul64(naive_expand(case, h, y0))
            base = torch.tensor([s < 0 for s in case.token_lora_slots])
            assert not out.isnan().any(), "a poisoned (unused) entry leaked in"
            assert torch.equal(out[base], cpu_silu_mul(y0)[base])
            torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5)
    finally:
        torch.set_num_threads(saved)


@needs_simd
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_op_runs_the_next_shrink_on_its_output(threads: int) -> None:
    """``then``: the down projection's shrink of the activation output, inside the fused op,
    equals ``lora_shrink`` of that output against float64, over per-slot ranks incl. 0 and
    partial (NaN poison past them never read), long and one-row items, base rows; writes
    only the entries the shrink writes (the rest of the strided h2 keeps its NaN)."""
    from dataclasses import replace

    from loraplex.ops.lora_testing import make_case, naive_shrink, random_ranks, written_mask

    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for k, (pattern, tokens, inter, rank) in enumerate([
                ("some_none", 40, 77, 8), ("zipf", 300, 160, 16), ("distinct", 7, 33, 16),
                ([3] * 61 + [-1] * 3 + [0] * 9, 73, 2816 // 8, 16)]):
            case = fused_case(pattern, tokens, inter, rank, seed=k)
            rng = random.Random(k)
            down = make_case(num_tokens=tokens, in_features=inter, widths=(24,), max_rank=rank,
                             slot_ranks=random_ranks(case.ranks.shape[0], 1, rank, rng),
                             pattern=case.token_lora_slots, seed=10 + k)
            y = torch.randn(tokens, 2 * inter, generator=torch.Generator().manual_seed(k))
            h2 = torch.full((tokens, rank + 5), float("nan"))[:, 2 : 2 + rank]  # row stride
            out = lora_cpu.lora_expand_silu_mul(
                poisoned_h(case), case.b, case.ranks, case.scalings, case.offsets, case.batch,
                y, None, (down.a, down.ranks, h2))
            want = naive_shrink(replace(down, x=out), h2)
            mask = written_mask(down)
            assert h2[~mask].isnan().all(), "wrote an entry the shrink does not write"
            assert not h2[mask].isnan().any()
            torch.testing.assert_close(h2[mask].double(), want[mask], rtol=1e-5, atol=1e-5)
    finally:
        torch.set_num_threads(saved)


def test_fused_declines_where_it_does_not_apply(monkeypatch) -> None:
    """None, with y untouched, for slices other than two equal halves, half precision, no
    AVX-512 or LORAPLEX_FUSED_ELEMENTWISE=0: the LoRA layer then expands and activates apart."""
    three = build(3, 9, "distinct", 4, seed=1)
    y = torch.randn(9, three.b.shape[1])
    h = poisoned_h(three)
    assert lora_cpu.lora_expand_silu_mul(h, three.b, three.ranks, three.scalings,
                                         three.offsets, three.batch, y) is None
    uneven = build(2, 9, "distinct", 4, seed=1, widths=(16, 32))
    assert run_fused(uneven)[0] is None
    half = build(2, 9, "distinct", 4, seed=1, widths=(16, 16), dtype=torch.bfloat16)
    y = torch.randn(9, 32, dtype=torch.bfloat16)
    assert lora_cpu.lora_expand_silu_mul(poisoned_h(half), half.b, half.ranks, half.scalings,
                                         half.offsets, half.batch, y) is None
    case = fused_case("distinct", 9, 16, 4, seed=2)
    monkeypatch.setenv("LORAPLEX_FUSED_ELEMENTWISE", "0")
    out, y0, y, _ = run_fused(case)
    assert out is None and torch.equal(y, y0)
    monkeypatch.delenv("LORAPLEX_FUSED_ELEMENTWISE")
    if CAN_BUILD and not isinstance(lora_cpu._native(), str):
        monkeypatch.setattr(lora_cpu._native(), "simd", 0)
        assert run_fused(case)[0] is None


@needs_simd
def test_lora_layer_fused_and_unfused_paths_agree() -> None:
    """``LoRALinear.silu_mul_forward`` with the fused op and without it (expand, then the
    activation), on one gate/up wrapper and batch: the same values within rounding."""
    from loraplex.layers.forward_context import ForwardBatch, forward_context
    from loraplex.layers.linear import MergedColumnLinear
    from loraplex.lora.buffers import SlotBuffers
    from loraplex.lora.layers import LoRALinear
    from loraplex.ops import get_lora_ops

    hidden, inter, rank = 64, 96, 8
    case = fused_case([0] * 6 + [-1] * 4 + [3] * 9 + [1], 20, inter, rank, seed=5)
    case.a.nan_to_num_(0.0)  # the layer's shrink writes every rank column it has
    base = MergedColumnLinear(hidden, [inter, inter], ["gate", "up"])
    g = torch.Generator().manual_seed(0)
    base.weight.data = torch.randn(2 * inter, hidden, generator=g) * 0.1
    a = torch.randn(case.a.shape[0], 2 * rank, hidden, generator=g) * 0.1
    bufs = SlotBuffers(a, case.b.nan_to_num(0.0), case.ranks, case.scalings, case.offsets, None)
    layer = LoRALinear(base, bufs, torch.zeros(20, 2 * rank), get_lora_ops("cpu"))
    x = torch.randn(20, hidden, generator=g)
    with forward_context(ForwardBatch(is_prefill=True, num_tokens=20, slot_mapping=None,
                                      lora=case.batch)):
        fused = layer.silu_mul_forward(x)
        layer.expand_silu_mul = None
        unfused = layer.silu_mul_forward(x)
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-6)


@needs_simd
def test_gated_mlp_with_the_down_shrink_fused_equals_the_plain_path() -> None:
    """``layers.activation.gated_mlp`` over a gate/up and a down ``LoRALinear``: with the fused
    op (the down shrink inside the activation's pass, ``forward_shrunk``) and with the plain
    path (each projection's own forward), the same values within rounding; base rows, an
    adapter without a down LoRA (rank 0) and partial ranks included."""
    from loraplex.layers.activation import gated_mlp, silu_and_mul
    from loraplex.layers.forward_context import ForwardBatch, forward_context
    from loraplex.layers.linear import MergedColumnLinear, RowLinear
    from loraplex.lora.buffers import SlotBuffers
    from loraplex.lora.layers import LoRALinear
    from loraplex.ops import get_lora_ops

    hidden, inter, rank, t = 64, 96, 8, 40
    slots = [0] * 6 + [-1] * 4 + [3] * 20 + [1] * 9 + [2]
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    ranks_gu = torch.tensor([[8, 8], [3, 0], [8, 5], [8, 8]], dtype=torch.int32)
    ranks_d = torch.tensor([[8], [0], [2], [8]], dtype=torch.int32)
    gu = MergedColumnLinear(hidden, [inter, inter], ["gate", "up"])
    gu.weight.data = rand(2 * inter, hidden)
    down = RowLinear(inter, hidden)
    down.weight.data = rand(hidden, inter)
    ops = get_lora_ops("cpu")
    scratch = torch.zeros(t, 3 * rank)
    wgu = LoRALinear(gu, SlotBuffers(rand(4, 2 * rank, hidden), rand(4, 2 * inter, rank),
                                     ranks_gu, torch.rand(4, 2, generator=g) + 0.5,
                                     (0, inter, 2 * inter), None), scratch, ops)
    wd = LoRALinear(down, SlotBuffers(rand(4, rank, inter), rand(4, hidden, rank), ranks_d,
                                      torch.rand(4, 1, generator=g) + 0.5, (0, hidden), None),
                    scratch, ops)
    x = torch.randn(t, hidden, generator=g)
    with forward_context(ForwardBatch(is_prefill=True, num_tokens=t, slot_mapping=None,
                                      lora=LoRABatch.from_token_slots(slots))):
        calls = []
        wd.shrink = lambda *args: calls.append(1) or ops.shrink(*args)
        fused = gated_mlp(wgu, wd, x)
        assert not calls  # the down shrink ran inside the fused op
        plain = wd(silu_and_mul(wgu(x)))
        assert calls
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


def test_pool_args_are_made_once_per_pool_and_remade_when_an_input_changes() -> None:
    """The C arguments of a weight pool are kept while the same pool, ranks, scalings and
    offsets come back, made again when any of them is another object or the pool's storage
    moved; a pool the C code does not take gives None (the op then runs lora_torch)."""
    a = torch.randn(4, 8, 16)
    ranks = torch.full((4, 1), 8, dtype=torch.int32)
    args = lora_cpu._pool_args(a, ranks)
    assert args is not None and args[0] == a.data_ptr() and args[1:3] == (8, 16)
    assert lora_cpu._pool_args(a, ranks) is args  # kept
    assert lora_cpu._pool_args(a, ranks.clone()) is not args  # other ranks: made again
    b, scalings = torch.randn(4, 24, 8), torch.ones(4, 2)
    ranks2 = torch.full((4, 2), 8, dtype=torch.int32)
    eargs = lora_cpu._pool_args(b, ranks2, scalings, (0, 16, 24))
    assert lora_cpu._pool_args(b, ranks2, scalings, (0, 16, 24)) is eargs
    assert lora_cpu._pool_args(b, ranks2, scalings, (0, 8, 24)) is not eargs  # other slices
    assert lora_cpu._pool_args(b, ranks2) is not None  # the same pool as a shrink's: no error
    b.set_(torch.randn(4, 24, 8))  # the storage moved: the old address must not be reused
    assert lora_cpu._pool_args(b, ranks2, scalings, (0, 16, 24))[0] == b.data_ptr()
    assert lora_cpu._pool_args(a.to(torch.bfloat16), ranks) is None
    assert lora_cpu._pool_args(a, ranks.long()) is None
    assert lora_cpu._pool_args(a.transpose(1, 2), ranks) is None
