"""Paged decode attention as Triton kernels (GPU; the interpreter runs them on CPU in tests).

Same contract as ``paged_attention_ref.paged_decode_attention_ref``; the kernel design is in
``paged_attention_kernels`` and ``docs/kernels.md``. Work is proportional to each sequence's
real context: a program reads only the blocks under ``context_lens[b]``, whatever the table's
width.

CUDA graphs: the launch depends on shapes only (``num_splits`` from the batch size, kv heads,
the SM count and the table's width), lengths and block ids are read on the device, and the
float32 partials go to a per-device scratch allocated once (``_scratch``; captured graphs
keep its address, so it is never freed or regrown) and reused by every layer, as launches
on one device are ordered. No host sync, no allocation besides ``out`` when not given.
"""

from __future__ import annotations

import functools
import math

import torch
import triton

from loraplex.ops import paged_attention_kernels as K

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCRATCH_FLOATS = 1 << 22  # 16 MiB of float32 partials per device
MAX_SPLITS = 128
TILE_BYTES = 16384  # one K (and one V) tile per loop trip: 64 tokens at d=128 in 16 bits


def supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the kernels take this cache dtype and head size (tl.dot needs d >= 16)."""
    return dtype in DTYPES and 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``q [B, H, d]`` -> ``out [B, H, d]`` (written and returned; allocated when None), the
    semantics of ``paged_attention_ref.paged_decode_attention_ref`` (with its
    ``sliding_window`` and ``softcap``). ``block_tables [B, W]``
    and ``context_lens [B]`` int32/int64 on q's device; ``1 <= context_lens[b] <= W *
    block_size`` (not checked: that would sync)."""
    bsz, heads, d = q.shape
    num_blocks, block_size, kv_heads, d_cache = k_cache.shape
    check_cache_operands(q, k_cache, v_cache, block_tables, context_lens, rows="B")
    if out is None:
        out = torch.empty(bsz, heads, d, dtype=q.dtype, device=q.device)
    _require(out.shape == q.shape and out.dtype == q.dtype and out.stride(2) == 1,
             "out: [B, H, d] in q's dtype, unit stride along d")
    if bsz == 0:
        return out
    group = heads // kv_heads
    tile_n = _tile_tokens(d, q.element_size())
    span = block_tables.shape[1] * block_size  # the most tokens a program may have to read
    if sliding_window is not None:
        span = min(span, sliding_window)
    splits = num_splits(bsz, kv_heads, heads, d, span, tile_n, q.device)
    m = denom = acc = out  # one split: the kernel stores the output itself, no partials
    if splits > 1:  # partials [B, H, splits] of m, denom and acc (d floats each) in the scratch
        parts = bsz * heads * splits
        scratch = _scratch(q.device)
        m, denom, acc = scratch[:parts], scratch[parts : 2 * parts], scratch[2 * parts :]
    K.paged_decode_split_kernel[(bsz, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, m, denom, acc,
        scale * math.log2(math.e), (softcap or 1.0) * math.log2(math.e), sliding_window or 0,
        heads, splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        BLOCK_SIZE=block_size, TILE_N=tile_n, DIRECT=splits == 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        HAS_WINDOW=sliding_window is not None, SOFTCAP=softcap is not None,
        # 3 stages: two tiles in flight behind the one being used, and no spills on sm_90
        # (2 stages spilled at fp32 d=128; paged_attention_aot.py reports it)
        num_warps=4, num_stages=3,
    )
    if splits > 1:
        K.paged_decode_reduce_kernel[(bsz, heads)](
            m, denom, acc, out, heads, splits, out.stride(0), out.stride(1),
            HEAD_DIM=d, SPLIT_PAD=triton.next_power_of_2(splits),
            SPLIT_CHUNK=min(triton.next_power_of_2(splits), max(1, 2048 // d)), num_warps=4,
        )
    return out


def num_splits(bsz: int, kv_heads: int, heads: int, head_dim: int, max_context: int,
               tile_n: int, device: torch.device) -> int:
    """Splits per (sequence, kv head): enough programs for ~4 per SM, no more than the tiles
    the table can hold (``max_context`` tokens), and partials that fit the scratch. Shapes
    only, so a graph captured for a batch size replays with the same launch."""
    programs = bsz * kv_heads
    want = triton.cdiv(4 * _num_sms(device), programs)
    fit = SCRATCH_FLOATS // (bsz * heads * (head_dim + 2))
    return max(1, min(want, triton.cdiv(max_context, tile_n), fit, MAX_SPLITS))


def _tile_tokens(head_dim: int, itemsize: int) -> int:
    # power of two in 16..128: 128 tokens at d=64, 64 at d=128 (16 bits); half that in fp32
    return max(16, min(128, TILE_BYTES // (head_dim * itemsize)))


@functools.cache
def _scratch_at(kind: str, index: int | None) -> torch.Tensor:
    return torch.empty(SCRATCH_FLOATS, dtype=torch.float32, device=torch.device(kind, index))


def _scratch(device: torch.device) -> torch.Tensor:
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    return _scratch_at(device.type, index)


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    # The interpreter (CPU tensors) has no SMs; size its grids as for an H100/H200 (132 SMs).
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def check_cache_operands(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                         block_tables: torch.Tensor, context_lens: torch.Tensor,
                         *extra: tuple[str, torch.Tensor], rows: str) -> None:
    """The checks both Triton attention wrappers make (ValueError naming the operand):
    ``q [rows, H, d]``, the paged caches, ``block_tables [B, W]``, ``context_lens [B]`` and
    the ``extra`` (name, index tensor) operands, int32/int64, all on one device."""
    heads, d = q.shape[1], q.shape[2]
    kv_heads, d_cache = k_cache.shape[2], k_cache.shape[3]
    bsz = context_lens.shape[0]
    _require(q.dtype in DTYPES and k_cache.dtype == v_cache.dtype == q.dtype,
             f"dtypes: q {q.dtype}, k_cache {k_cache.dtype}, v_cache {v_cache.dtype}; "
             f"must match and be one of {DTYPES}")
    _require(supports(q.dtype, d) and d_cache == d,
             f"head_dim {d} (cache {d_cache}): a power of two in 16..256")
    _require(heads % kv_heads == 0, f"heads {heads} not a multiple of kv heads {kv_heads}")
    _require(q.stride(2) == 1, f"q: [{rows}, H, d] with unit stride along d")
    _require(k_cache.is_contiguous() and v_cache.is_contiguous()
             and v_cache.shape == k_cache.shape, "k_cache, v_cache: contiguous, same shape")
    _require(block_tables.dim() == 2 and block_tables.shape[0] == bsz
             and block_tables.stride(1) == 1, "block_tables: [B, W], unit stride along W")
    _require(context_lens.shape == (bsz,) and context_lens.is_contiguous(), "context_lens: [B]")
    for name, t in (("block_tables", block_tables), ("context_lens", context_lens), *extra):
        _require(t.dtype in (torch.int32, torch.int64), f"{name}: int32 or int64, got {t.dtype}")
    devices = {t.device for t in (q, k_cache, v_cache, block_tables, context_lens)}
    devices |= {t.device for _, t in extra}
    _require(len(devices) == 1, f"all tensors must be on one device, got {devices}")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"paged_attention_triton: {what}")
