"""The ``"cpu"`` LoRA backend (``ops/lora_cpu.py`` over ``ops/lora_cpu.c``) beyond the op sweeps
of test_lora_ops.py / test_dora_ops.py (which run it against the naive oracle): it really
runs the C code for float32 and the torch code otherwise, its work items cover the segments
exactly and feed every thread, the library builds once and is cached, and a machine where it
cannot build falls back to the torch backend with the reason."""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
import torch

from loraplex.ops import lora_cpu, lora_torch, native_build, resolve_lora_backend
from loraplex.ops.lora_meta import LoRABatch
from loraplex.ops.lora_testing import build, check_expand, check_shrink

CAN_BUILD = sys.platform.startswith("linux") and shutil.which("cc") is not None
needs_build = pytest.mark.skipif(not CAN_BUILD, reason="needs Linux and a C compiler")


@needs_build
def test_builds_on_linux_with_a_compiler() -> None:
    assert lora_cpu.unavailable_reason() is None
    assert resolve_lora_backend("auto", "cpu") == "cpu"


@pytest.fixture(params=["simd", "blas"])
def kernels(request, monkeypatch):
    """Both code paths of the C library: its AVX-512 shrink (where this CPU has it) and
    torch's BLAS GEMM (what CPUs without AVX-512 run)."""
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
    items = lora_cpu._work_items(batch)
    chunk = max(lora_cpu.MIN_CHUNK, -(-1042 // 8))  # ~4 items per thread
    assert items[:, 1].max() <= chunk and len(items) >= 8
    rows = np.full(len(slots), -1)
    for start, n, slot in items.tolist():
        assert (rows[start : start + n] == -1).all()  # no row in two items
        rows[start : start + n] = slot
    assert rows.tolist() == slots  # every adapter row once, with its slot
    assert lora_cpu._work_items(batch) is items  # cached for the batch's other projections
    batch.host_segs = [(0, 4, 2)]  # the builder makes a new list each step: cut again
    assert lora_cpu._work_items(batch).tolist() == [[0, 4, 2]]


def test_one_thread_keeps_segments_whole(monkeypatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    batch = LoRABatch.from_token_slots([0] * 700 + [2] * 3)
    assert lora_cpu._work_items(batch).tolist() == [[0, 700, 0], [700, 3, 2]]


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
