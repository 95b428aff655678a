"""The Triton LoRA kernels against the torch reference and the float64 oracle.

Without CUDA they run under the Triton interpreter (TRITON_INTERPRET=1, set here before the
kernels are defined); with CUDA they run compiled on the GPU. Both the segment (prefill) and
the decode-shaped paths are checked on the same inputs, over stacked slices with uneven
widths, per-slice ranks incl. 0, adapter mixes, widths that are not a multiple of any block,
and the padded metadata CUDA graphs rely on."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
_SAVED_FLAG = os.environ.get("TRITON_INTERPRET")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels' @triton.jit runs

triton = pytest.importorskip("triton")

from dataclasses import replace  # noqa: E402

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from loraplex.ops import lora_ref, lora_triton, lora_triton_kernels  # noqa: E402
from loraplex.ops.lora_meta import LoRABatch  # noqa: E402
from loraplex.ops.lora_testing import (  # noqa: E402
    PATTERNS,
    LoRACase,
    build,
    check_expand,
    check_shrink,
    make_case,
)

if not CUDA and not isinstance(lora_triton_kernels.shrink_decode_kernel, InterpretedFunction):
    importlib.reload(lora_triton_kernels)  # imported earlier without the interpreter flag
# Triton also reads the flag at run time: the fixture below sets it for each test of this
# module only, so it does not leak into other test modules.
if _SAVED_FLAG is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _SAVED_FLAG

DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        # Interpreted grids cost ~ms per program: size them as for a small GPU (bigger tiles).
        monkeypatch.setattr(lora_triton, "_num_sms", lambda device: 4)


def paths(batch: LoRABatch) -> dict[str, LoRABatch]:
    """The batch as-is plus both kernel paths forced: decode (per-token; correct for any
    batch) and segment with ``max_seg_len`` held at a loose static bound, as under graphs."""
    return {
        "natural": batch,
        "decode": replace(batch, max_seg_len=min(batch.max_seg_len, 1)),
        "segment": replace(batch, max_seg_len=max(batch.max_seg_len, 5) + 11),
    }


def check_all_paths(case: LoRACase, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    for name, batch in paths(case.batch).items():
        c = replace(case, batch=batch)
        try:
            check_shrink(lora_triton.lora_shrink, c, rtol=tol, atol=tol)
            check_expand(lora_triton.lora_expand, c, rtol=tol, atol=tol)
        except AssertionError as e:
            raise AssertionError(f"{name} path: {e}") from e


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("n", [1, 2, 3])
def test_kernels_match_oracle(n: int, pattern: str, dtype: torch.dtype) -> None:
    case = build(n, 7 if pattern in ("distinct", "some_none") else 16, pattern, 16,
                 seed=31 * n + len(pattern), dtype=dtype, device=DEVICE)
    check_all_paths(case, dtype)


@pytest.mark.parametrize("num_tokens", [1, 3, 133])
def test_token_counts(num_tokens: int) -> None:
    case = build(3, num_tokens, "zipf", 16, seed=num_tokens, dtype=torch.float16, device=DEVICE,
                 num_slots=4)
    check_all_paths(case, torch.float16)


@pytest.mark.parametrize("max_rank", [1, 8, 64, 128])
def test_ranks(max_rank: int) -> None:
    # rank 128 > every BLOCK_R: several rank iterations in expand.
    case = build(2, 5, [0, 0, 1, -1, 1], max_rank, seed=max_rank, device=DEVICE, num_slots=3)
    check_all_paths(case, torch.float32)


def test_unaligned_widths() -> None:
    """in = 200 and slice widths 150/50/46: no width is a multiple of a block size."""
    case = build(3, 9, [1, 1, 0, 0, 0, 2, -1, 2, 2], 16, seed=5, dtype=torch.float16,
                 device=DEVICE, in_features=200, widths=(150, 50, 46), num_slots=3)
    check_all_paths(case, torch.float16)


def test_real_decode_heuristic(monkeypatch) -> None:
    """Block sizes as chosen for a 132-SM GPU (tiny column tiles that straddle slices)."""
    monkeypatch.setattr(lora_triton, "_num_sms", lambda device: 132)
    case = build(3, 4, "distinct", 8, seed=9, dtype=torch.float16, device=DEVICE, num_slots=4)
    check_all_paths(case, torch.float16)


def _force_split_k(monkeypatch, split: int, block_k: int = 16) -> list[tuple[int, int]]:
    """Pin both shrink configs to split-K with small K steps; returns the (K_CHUNK, SPLIT_K)
    pairs the launches use."""
    monkeypatch.setattr(lora_triton, "_shrink_decode_config",
                        lambda t, nr, k, dtype, device: (16, block_k, split, 4))
    monkeypatch.setattr(lora_triton, "_shrink_segment_config",
                        lambda batch, nr, k, x: (16, 64, block_k, split))
    used: list[tuple[int, int]] = []
    real = lora_triton._k_chunks

    def spy(k: int, bk: int, sp: int) -> tuple[int, int]:
        used.append(real(k, bk, sp))
        return used[-1]

    monkeypatch.setattr(lora_triton, "_k_chunks", spy)
    return used


def _counters_clear() -> bool:
    return int(lora_triton._split_k_buffers(torch.device(DEVICE))[1].count_nonzero()) == 0


@pytest.mark.parametrize(("split", "chunks"), [(5, (48, 5)), (40, (16, 13)), (2, (112, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_shrink(monkeypatch, split: int, chunks: tuple[int, int],
                        dtype: torch.dtype) -> None:
    """Split-K shrink on both paths: in = 200 is no multiple of the chunk (last chunk 8 or 88
    wide), per-slice ranks incl. 0, tokens without an adapter; the last program of each tile
    sums the partials and every arrival counter is back at 0 afterwards (twice in a row)."""
    used = _force_split_k(monkeypatch, split)
    for seed in (1, 2):
        case = build(3, 9, "some_none", 16, seed=seed, dtype=dtype, device=DEVICE,
                     in_features=200, widths=(70, 40, 30), num_slots=4)
        check_all_paths(case, dtype)
        assert _counters_clear()
    assert used and all(u == chunks for u in used), used


def test_k_chunks_cover_k() -> None:
    for k in (1, 15, 16, 200, 4096, 14336):
        for bk in (16, 64, 512):
            for split in (1, 2, 3, 7, 28, 1000):
                chunk, s = lora_triton._k_chunks(k, bk, split)
                assert 1 <= s <= max(split, 1) and chunk * s >= k and chunk * (s - 1) < k
                assert s == 1 or chunk % bk == 0


def _launch_args(launch) -> dict:
    """A recorded launch's arguments by the kernel's parameter names."""
    import inspect

    fn = getattr(lora_triton_kernels, launch.kernel).fn
    return dict(zip(inspect.signature(fn).parameters, launch.args)) | launch.kwargs


def _grid_shapes():
    from loraplex.ops.lora_triton_aot import OpShape, target_shapes

    odd = [OpShape("odd r=8 decode 5", 5000, (1000, 200, 96), 8, 5, num_adapters=3),
           OpShape("odd r=128 decode 3", 96, (48,), 128, 3, num_adapters=2),
           OpShape("odd r=4 prefill 300", 3000, (700, 300), 4, 300, num_adapters=3, seg_len=100),
           # 260 64x64 tiles: a 2-way split-K would overflow the scratch by a few percent
           OpShape("many r=64 prefill 16640", 4096, (4096,), 64, 260 * 64, seg_len=64)]
    return target_shapes(decode_tokens=(1, 8, 32, 128, 512)) + odd


@pytest.mark.parametrize("sms", [4, 132])
def test_launch_grids_cover_every_output_tile_once(monkeypatch, sms: int) -> None:
    """For the Llama-8B shapes (and a few odd ones), whatever block sizes the heuristics pick:
    shrink's grid has one program per token (decode) or covers every segment row (prefill),
    covers every stacked rank column with no idle column tile, and its K chunks cover ``in``
    with none empty; split-K partials and counters fit the scratch; expand enumerates exactly
    the (slice, column tile) pairs; no grid dimension past the first exceeds CUDA's 65535."""
    from loraplex.ops.lora_triton_aot import record_op_launches

    monkeypatch.setattr(lora_triton, "_num_sms", lambda device: sms)
    cdiv = triton.cdiv
    for shape in _grid_shapes():
        shrink, expand = record_op_launches(shape)
        nr, k = len(shape.widths) * shape.rank, shape.in_features
        s, e = _launch_args(shrink), _launch_args(expand)
        assert all(d <= 65535 for d in shrink.grid[1:] + expand.grid[1:]), shape.name
        if shape.seg_len is None:
            assert shrink.kernel == "shrink_decode_kernel"
            assert shrink.grid[0] == shape.num_tokens, shape.name
            assert expand.kernel == "expand_decode_kernel" and expand.grid[0] == shape.num_tokens
            split, out_tiles = shrink.grid[2], shrink.grid[0] * shrink.grid[1]
            tile = s["BLOCK_N"]
        else:
            segs = cdiv(shape.num_tokens, shape.seg_len)
            assert shrink.grid[1] * s["BLOCK_M"] >= shape.seg_len > (shrink.grid[1] - 1) * \
                s["BLOCK_M"], shape.name
            assert shrink.grid[2] % segs == 0, shape.name
            split, out_tiles = shrink.grid[2] // segs, shrink.grid[0] * shrink.grid[1] * segs
            tile = s["BLOCK_M"] * s["BLOCK_N"]
            assert expand.grid[1:] == (cdiv(shape.seg_len, e["BLOCK_M"]), segs), shape.name
        # every rank column, no idle column tile
        assert cdiv(nr, s["BLOCK_N"]) == shrink.grid[1 if shape.seg_len is None else 0]
        # K chunks: SPLIT_K of them, each a whole number of BLOCK_K, covering in, none empty
        assert s["SPLIT_K"] == split and split <= s["SPLIT_BOUND"], shape.name
        assert s["K_CHUNK"] * split >= k > s["K_CHUNK"] * (split - 1), shape.name
        if split > 1:
            assert s["K_CHUNK"] % s["BLOCK_K"] == 0, shape.name
            assert out_tiles <= lora_triton.WS_COUNTERS, shape.name
            assert out_tiles * tile * split <= lora_triton.WS_FLOATS, shape.name
        pairs = sum(cdiv(w, e["BLOCK_N"]) for w in shape.widths)
        assert expand.grid[1 if shape.seg_len is None else 0] == pairs, shape.name


def _stale_batch(real: LoRABatch, token_lora_slots: torch.Tensor, seg_slot: int) -> LoRABatch:
    """``real`` inside longer buffers, as the manager and CUDA graphs hold it: entries past
    ``num_segs`` hold leftovers of an earlier, longer batch."""
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return replace(
        real,
        seg_starts=torch.cat([real.seg_starts, torch.tensor([3, 9, 1], **i32)]),
        seg_lens=torch.cat([real.seg_lens, torch.tensor([40, 7, 2], **i32)]),
        seg_lora_slots=torch.cat([real.seg_lora_slots, torch.full((3,), seg_slot, **i32)]),
        token_lora_slots=token_lora_slots,
    )


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("layout", ["manager", "graph"])
def test_padded_and_stale_metadata(monkeypatch, layout: str, split: int) -> None:
    """"manager": buffers longer than the batch with stale *valid* entries past num_segs /
    num_tokens, activations exactly T rows. "graph": static activations with more rows than
    tokens, token_lora_slots padded with -1, segment entries past num_segs with slot -1.
    ``split`` 3: shrink forced to split-K (stale tiles must not leave counters set)."""
    if split > 1:
        _force_split_k(monkeypatch, split)
    slots = [2, 2, 0, 1, 1, 1, -1, 0]
    t, pad = len(slots), 5
    rows = t if layout == "manager" else t + pad
    case = make_case(num_tokens=rows, in_features=64, widths=(48, 16, 16), max_rank=16,
                     slot_ranks=[[16, 8, 0], [4, 16, 16], [16, 16, 16]],
                     pattern=slots + [-1] * (rows - t), device=DEVICE, seed=2)
    real = LoRABatch.from_token_slots(slots, device=DEVICE)
    tail = [1] * pad if layout == "manager" else [-1] * pad
    token_lora_slots = torch.tensor(slots + tail, dtype=torch.int32, device=DEVICE)
    stale = _stale_batch(real, token_lora_slots, 1 if layout == "manager" else -1)
    variants = paths(stale)
    if layout == "graph":  # segment path captured with num_segs at its static bound
        variants["static_segs"] = replace(variants["segment"], num_segs=len(stale.seg_starts))
    for name, batch in variants.items():
        c = replace(case, batch=batch)
        out_ref = torch.zeros(rows, 48, device=DEVICE)
        out = out_ref.clone()
        lora_ref.lora_shrink(c.x, c.a, c.ranks, real, out_ref)
        lora_triton.lora_shrink(c.x, c.a, c.ranks, batch, out)
        assert torch.allclose(out[:t], out_ref[:t], atol=1e-5), name
        y_ref = torch.randn(rows, 80, device=DEVICE)
        y = y_ref.clone()
        lora_ref.lora_expand(out_ref, c.b, c.ranks, c.scalings, c.offsets, real, y_ref)
        lora_triton.lora_expand(out_ref, c.b, c.ranks, c.scalings, c.offsets, batch, y)
        assert torch.allclose(y, y_ref, atol=1e-5), name
        assert split == 1 or _counters_clear(), name


def test_wrapper_rejects_bad_inputs() -> None:
    case = build(1, 4, "same", 8, seed=1, device=DEVICE)
    out = torch.zeros(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="dtypes must match"):
        lora_triton.lora_shrink(case.x.half(), case.a, case.ranks, case.batch, out)
    with pytest.raises(ValueError, match="a: contiguous"):
        lora_triton.lora_shrink(case.x, case.a.transpose(1, 2).contiguous().transpose(1, 2),
                                case.ranks, case.batch, out)
    with pytest.raises(ValueError, match="ranks"):
        lora_triton.lora_shrink(case.x, case.a, case.ranks.long(), case.batch, out)
    y = torch.zeros(4, 72, device=DEVICE)
    with pytest.raises(ValueError, match="offsets"):
        lora_triton.lora_expand(out, case.b, case.ranks, case.scalings, (0, 70), case.batch, y)


def test_kernels_compile_for_hopper() -> None:
    """Every launch the wrappers make for the H100/H200 target shapes (bf16) and fp16/fp32
    variants compiles to an sm_90 cubin, without spills. No GPU needed (Triton ships ptxas);
    runs in a subprocess because this module's kernels are interpreted."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "loraplex.ops.lora_triton_aot"], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if "_kernel" in line]
    assert len(lines) >= 12, proc.stdout
    assert all("stack=0 " in line or "stack=None " in line for line in lines), proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("pattern", PATTERNS)
def test_bf16_on_gpu(pattern: str) -> None:
    case = build(3, 133, pattern, 64, seed=3, dtype=torch.bfloat16, device="cuda",
                 in_features=1000, widths=(512, 128, 128), num_slots=8)
    check_all_paths(case, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("in_features", [512, 4000])  # 4000: split-K shrink (8 chunks)
def test_decode_path_replays_under_cuda_graph(in_features: int) -> None:
    case = build(3, 32, "distinct", 16, seed=4, dtype=torch.bfloat16, device="cuda",
                 in_features=in_features, widths=(256, 64, 64), num_slots=8)
    h = torch.zeros(32, 48, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(32, 384, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        lora_triton.lora_shrink(case.x, case.a, case.ranks, case.batch, h)
        lora_triton.lora_expand(h, case.b, case.ranks, case.scalings, case.offsets, case.batch, y)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()  # split-K counters must be back at 0 for the next replay
    y.zero_()
    lora_slots = case.batch.token_lora_slots
    lora_slots.copy_(lora_slots.roll(1))  # new metadata, same graph
    graph.replay()
    torch.cuda.synchronize()
    rolled = replace(case, batch=LoRABatch.from_token_slots(case.batch.token_lora_slots.tolist(),
                                                            device="cuda"))
    y_ref = torch.zeros_like(y)
    h_ref = torch.zeros_like(h)
    lora_ref.lora_shrink(rolled.x, rolled.a, rolled.ranks, rolled.batch, h_ref)
    lora_ref.lora_expand(h_ref, rolled.b, rolled.ranks, rolled.scalings, rolled.offsets,
                         rolled.batch, y_ref)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
