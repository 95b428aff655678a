"""Triton (GPU) batched LoRA ops with the torch reference's signatures and semantics
(see ``lora_ref`` for them written as PyTorch code, and ``docs/kernels.md`` for the design).

``batch.decode_shaped`` (every segment <= 4 tokens) picks the per-token decode kernels, else
the segment (prefill) kernels. Stacked slices (q/k/v, gate/up) run in one launch per op.

CUDA graphs: the decode path is capturable. Its grid is ``(min(len(batch.token_lora_slots),
rows of x/out resp. h/y), column tiles[, K chunks])``: shapes only, so a graph captured for a
padded batch size replays for any metadata written into the same buffers.
``token_lora_slots`` entries of padding rows should hold -1 (they exit at once; a stale valid
slot only writes padding rows).
The segment path's grid is ``(column tiles, cdiv(batch.max_seg_len, BLOCK_M),
batch.num_segs * K chunks)``, so stale entries past ``num_segs`` (the manager reuses its
buffers) are never read. To capture it, hold ``max_seg_len`` and ``num_segs`` at static bounds
for the graph and fill the extra segment entries with slot -1 (or length 0): tiles past a segment's
length and slot -1 segments exit at once. Neither path allocates or syncs: split-K shrink
uses a per-device scratch allocated once (``_split_k_buffers``; warm up before capturing).
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from loraplex.ops import lora_triton_kernels as K
from loraplex.ops.lora_meta import ColumnScales, LoRABatch

MAX_SLICES = 4
_HALF = (torch.float16, torch.bfloat16)


def lora_shrink(
    x: torch.Tensor, a: torch.Tensor, ranks: torch.Tensor, batch: LoRABatch, out: torch.Tensor
) -> None:
    """``out[seg, i*R : i*R + r] = x[seg] @ a[slot, i*R : i*R + r].T`` per segment and slice
    (same contract as ``lora_ref.lora_shrink``). ``x [T', in]``, ``a [S, n*R, in]``,
    ``ranks [S, n]`` int32, ``out [T, n*R]`` in x's dtype."""
    n, nr, k = ranks.shape[1], a.shape[1], a.shape[2]
    _check_common(x, a, ranks, out, batch)
    _require(a.dim() == 3 and a.is_contiguous() and nr % n == 0, "a: contiguous [S, n*R, in]")
    _require(x.dim() == 2 and x.shape[1] == k and x.stride(1) == 1, "x: [T, in], unit col stride")
    _require(out.dim() == 2 and out.shape[1] == nr and out.stride(1) == 1, "out: [T, n*R]")
    r = nr // n
    if batch.decode_shaped:
        t = min(batch.token_lora_slots.shape[0], x.shape[0], out.shape[0])
        if t == 0:
            return
        block_n, block_k, split, warps = _shrink_decode_config(t, nr, k, x.dtype, x.device)
        tiles = t * triton.cdiv(nr, block_n)
        chunk, split = _k_chunks(k, block_k, min(_fit_split(split, tiles, block_n), 65535))
        ws, counts = _split_k_buffers(x.device) if split > 1 else (out, batch.token_lora_slots)
        K.shrink_decode_kernel[(t, triton.cdiv(nr, block_n), split)](
            x, a, ranks, batch.token_lora_slots, out, ws, counts, k, chunk, split, nr, r, n,
            x.stride(0), a.stride(0), a.stride(1), out.stride(0),
            BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_BOUND=_bound(split), num_warps=warps,
            num_stages=2,
        )
        return
    if batch.max_seg_len == 0 or batch.num_segs == 0:
        return
    block_m, block_n, block_k, split = _shrink_segment_config(batch, nr, k, x)
    grid = [triton.cdiv(nr, block_n), triton.cdiv(batch.max_seg_len, block_m), batch.num_segs]
    split = min(_fit_split(split, math.prod(grid), block_m * block_n), 65535 // grid[2])
    chunk, split = _k_chunks(k, block_k, split)
    ws, counts = _split_k_buffers(x.device) if split > 1 else (out, batch.token_lora_slots)
    grid[2] *= split
    K.shrink_segment_kernel[tuple(grid)](
        x, a, ranks, batch.seg_starts, batch.seg_lens, batch.seg_lora_slots, out, ws, counts,
        k, chunk, split, nr, r, n, x.stride(0), a.stride(0), a.stride(1), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_PRECISION=_precision(x),
        SPLIT_BOUND=_bound(split), num_warps=4, num_stages=4,
    )


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
    """``y[seg, off_i:off_i+1] += scalings[slot, i] * h[seg, i*R : i*R + r] @
    b[slot, off_i:off_i+1, :r].T`` in place (same contract as ``lora_ref.lora_expand``).
    ``h [T, n*R]``, ``b [S, out, R]``, ``scalings [S, n]`` float32, ``y [T', out]``;
    ``col_scales`` (DoRA) applied in the epilogue to flagged slots."""
    n, r = ranks.shape[1], b.shape[2]
    _check_common(h, b, ranks, y, batch)
    _require(b.dim() == 3 and b.is_contiguous(), "b: contiguous [S, out, R]")
    _require(h.dim() == 2 and h.shape[1] == n * r and h.stride(1) == 1, "h: [T, n*R]")
    _require(y.dim() == 2 and y.shape[1] == b.shape[1] and y.stride(1) == 1, "y: [T, out]")
    _require(scalings.dtype == torch.float32 and scalings.is_contiguous()
             and tuple(scalings.shape) == tuple(ranks.shape), "scalings: float32 [S, n]")
    _require(len(offsets) == n + 1 and offsets[0] == 0 and offsets[-1] == y.shape[1]
             and all(offsets[i] <= offsets[i + 1] for i in range(n)) and n <= MAX_SLICES,
             f"offsets {offsets}: n+1 ascending ints from 0 to out (n <= {MAX_SLICES})")
    offs = [int(o) for o in offsets] + [int(offsets[-1])] * (MAX_SLICES + 1 - len(offsets))
    cs = _column_scale_args(col_scales, b, y)
    widths = [offsets[i + 1] - offsets[i] for i in range(n)]
    widest = max(widths)
    if widest == 0:
        return
    if batch.decode_shaped:
        t = min(batch.token_lora_slots.shape[0], h.shape[0], y.shape[0])
        if t == 0:
            return
        block_n, block_r = _expand_decode_config(r, widest)
        tiles = sum(triton.cdiv(w, block_n) for w in widths)  # (slice, tile) pairs, exactly
        K.expand_decode_kernel[(t, tiles)](
            h, b, ranks, scalings, batch.token_lora_slots, y, *cs[:3], r, n, *offs,
            h.stride(0), b.stride(0), b.stride(1), y.stride(0), cs[3],
            BLOCK_N=block_n, BLOCK_R=block_r, HAS_COL_SCALES=col_scales is not None,
            num_warps=4, num_stages=2,
        )
        return
    if batch.max_seg_len == 0 or batch.num_segs == 0:
        return
    block_m, block_n, block_r = _expand_segment_config(batch, r, widest, y)
    tiles = sum(triton.cdiv(w, block_n) for w in widths)
    grid = (tiles, triton.cdiv(batch.max_seg_len, block_m), batch.num_segs)
    K.expand_segment_kernel[grid](
        h, b, ranks, scalings, batch.seg_starts, batch.seg_lens, batch.seg_lora_slots, y,
        *cs[:3], r, n, *offs, h.stride(0), b.stride(0), b.stride(1), y.stride(0), cs[3],
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=block_r, DOT_PRECISION=_precision(y),
        HAS_COL_SCALES=col_scales is not None,
        num_warps=8 if block_m * block_n >= 8192 else 4, num_stages=2,
    )


def _column_scale_args(cs: ColumnScales | None, b: torch.Tensor, y: torch.Tensor) -> tuple:
    """(scale, shift, flags, row stride) for the expand kernels; y stands in for absent ones
    (never read: HAS_COL_SCALES is off)."""
    if cs is None:
        return y, y, y, 0
    s = b.shape[0]
    _require(cs.scale.dtype == cs.shift.dtype == torch.float32 and cs.scale.is_contiguous()
             and cs.shift.is_contiguous() and tuple(cs.scale.shape) == (s, y.shape[1])
             and cs.shift.shape == cs.scale.shape, "col_scales: float32 contiguous [S, out]")
    _require(cs.flags.dtype == torch.int32 and tuple(cs.flags.shape) == (s,)
             and {cs.scale.device, cs.flags.device} == {y.device}, "col_scales.flags: int32 [S]")
    return cs.scale, cs.shift, cs.flags, cs.scale.stride(0)


# ---- launch configuration (block sizes tuned for decode/prefill shapes; see docs/kernels.md)

# Split-K scratch, one per device, allocated on first use and kept for the process (captured
# CUDA graphs hold its address, so it is never freed or regrown): float32 partial tiles and
# one int32 arrival counter per output tile, zero between launches (the kernels reset them).
# Launches on one device must be ordered (one stream), as for any in-place op.
WS_FLOATS = 1 << 21  # 8 MiB
WS_COUNTERS = 1 << 16


@functools.cache
def _split_k_buffers_at(kind: str, index: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    device = torch.device(kind, index)
    return (torch.empty(WS_FLOATS, dtype=torch.float32, device=device),
            torch.zeros(WS_COUNTERS, dtype=torch.int32, device=device))


def _split_k_buffers(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _split_k_buffers_at(device.type, index)


def _bound(split: int) -> int:
    # Compiled variants: the split-K reduction is unrolled to the next power of two.
    return 1 if split == 1 else triton.next_power_of_2(split)


def _fit_split(split: int, tiles: int, tile_elems: int) -> int:
    """Largest split <= ``split`` whose partials and counters fit the split-K scratch."""
    if tiles > WS_COUNTERS:
        return 1
    return max(1, min(split, WS_FLOATS // (tiles * tile_elems)))


def _k_chunks(k: int, block_k: int, split: int) -> tuple[int, int]:
    """(K_CHUNK, SPLIT_K): ``split`` near-equal chunks of ``in``, each a multiple of BLOCK_K
    (so none is empty: SPLIT_K = cdiv(K, K_CHUNK) may come out below ``split``)."""
    if split <= 1:
        return k, 1
    chunk = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    return chunk, triton.cdiv(k, chunk)


def _shrink_decode_config(
    t: int, nr: int, k: int, dtype: torch.dtype, device: torch.device
) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, split, num_warps): 2 rank columns a program. When that leaves few
    programs (< 4 a SM) and K is wide, split K in ~4096-wide chunks. The K loop has no dot,
    so its loads are not pipelined: bandwidth comes from many programs with few loop trips,
    and split-K adds programs only where the grid is small (it costs a reduction). Chosen by
    an on-device sweep over the alternatives; the timings are in docs/kernels.md."""
    del dtype
    block_n = min(2, max(1, triton.next_power_of_2(nr)))
    programs = t * triton.cdiv(nr, block_n)
    split = triton.cdiv(k, 4096) if programs < 4 * _num_sms(device) else 1
    block_k = min(2048 if split == 1 else 1024, max(16, triton.next_power_of_2(k)))
    return block_n, block_k, min(split, triton.cdiv(k, block_k)), 4


def _shrink_segment_config(
    batch: LoRABatch, nr: int, k: int, x: torch.Tensor
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, split). All stacked rank columns in one tile up to 64 (x
    read once), 64-row tiles (A re-read once per 64 tokens, from L2), and split-K (chunks of
    >= 8 K steps, at most 8 chunks) until ~2 programs per SM, rather than smaller M tiles
    that re-read A."""
    block_n = min(64, max(16, triton.next_power_of_2(nr)))
    block_m = min(64, max(16, triton.next_power_of_2(batch.max_seg_len)))
    block_k = 64 if x.dtype in _HALF else 32
    tiles = (triton.cdiv(nr, block_n) * triton.cdiv(batch.max_seg_len, block_m)
             * batch.num_segs)
    split = min(triton.cdiv(2 * _num_sms(x.device), tiles), max(1, k // (8 * block_k)), 8)
    return block_m, block_n, block_k, max(split, 1)


def _expand_decode_config(r: int, widest: int) -> tuple[int, int]:
    block_r = min(64, max(4, triton.next_power_of_2(r)))
    block_n = min(max(4096 // block_r, 32), 512, max(16, triton.next_power_of_2(widest)))
    return block_n, block_r


def _expand_segment_config(
    batch: LoRABatch, r: int, widest: int, y: torch.Tensor
) -> tuple[int, int, int]:
    block_m = min(64, max(16, triton.next_power_of_2(batch.max_seg_len)))
    block_n = min(128 if y.dtype in _HALF else 64, max(16, triton.next_power_of_2(widest)))
    block_r = min(64 if y.dtype in _HALF else 32, max(16, triton.next_power_of_2(r)))
    return block_m, block_n, block_r


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    # The interpreter (CPU tensors) has no SMs; size its grids as for an H100/H200 (132 SMs).
    return _sm_count(device.index or 0) if device.type == "cuda" else 132


def _precision(t: torch.Tensor) -> str:
    # float32 operands would be truncated to TF32 by default; keep them exact like the reference.
    return "tf32" if t.dtype in _HALF else "ieee"


def _check_common(x, w, ranks, out, batch: LoRABatch) -> None:
    _require(x.dtype in (*_HALF, torch.float32), f"activations dtype {x.dtype}: fp16/bf16/fp32")
    _require(w.dtype == x.dtype and out.dtype == x.dtype,
             f"dtypes must match: activations {x.dtype}, weights {w.dtype}, output {out.dtype}")
    _require(ranks.dtype == torch.int32 and ranks.is_contiguous() and ranks.dim() == 2
             and ranks.shape[0] == w.shape[0], "ranks: contiguous int32 [S, n]")
    for name in ("seg_starts", "seg_lens", "seg_lora_slots", "token_lora_slots"):
        meta = getattr(batch, name)
        _require(meta.dtype == torch.int32 and meta.is_contiguous(), f"batch.{name}: int32")
    devices = {t.device for t in (x, w, ranks, out, batch.token_lora_slots, batch.seg_lora_slots)}
    _require(len(devices) == 1, f"all tensors must be on one device, got {devices}")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"lora_triton: {what}")
