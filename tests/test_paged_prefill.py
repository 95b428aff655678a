"""Extend attention (prefill chunks over a cached prefix): the backends against the plain
float64 reference, and the reference against plain causal SDPA and paged decode.

Cases mix, in one batch, chunks of 1..64 tokens after prefixes of 0..200 cached tokens that
cross block boundaries, with out-of-order block tables that hold garbage past each context,
GQA groups 1/2/4 (none repeated), head dims 64/128, float32 and float16, sliding windows
shorter and longer than the contexts, and softcap.

Without CUDA the Triton kernel runs under the interpreter (TRITON_INTERPRET=1, set here before
it is defined; float32/float16 only, the interpreter gets bfloat16 dots wrong) on small cases;
with CUDA it runs compiled, bfloat16 included.
"""

from __future__ import annotations

import importlib
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

CUDA = torch.cuda.is_available()
_SAVED_FLAG = os.environ.get("TRITON_INTERPRET")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel's @triton.jit runs

from loraplex.ops import paged_prefill_torch  # noqa: E402
from loraplex.ops.paged_attention import (  # noqa: E402
    paged_decode_attention,
    paged_prefill_attention,
)
from loraplex.ops.paged_attention_ref import (  # noqa: E402
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
)

try:
    from triton.runtime.interpreter import InterpretedFunction

    from loraplex.ops import paged_prefill_kernels
except ImportError:  # no triton: the kernel tests skip
    paged_prefill_kernels = None
if (paged_prefill_kernels is not None and not CUDA
        and not isinstance(paged_prefill_kernels.paged_prefill_kernel, InterpretedFunction)):
    importlib.reload(paged_prefill_kernels)  # imported earlier without the interpreter flag
if _SAVED_FLAG is None:  # the fixture below sets it per test, so it does not leak elsewhere
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _SAVED_FLAG

DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 2e-3}
# the kernel rounds probabilities to the cache dtype before the P @ V dot
KERNEL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
BLOCK = 16
needs_triton = pytest.mark.skipif(paged_prefill_kernels is None, reason="needs triton")


def make_case(prefixes: list[int], chunks: list[int], heads: int, kv_heads: int, d: int,
              dtype: torch.dtype, width: int | None = None, seed: int = 0,
              block: int = BLOCK, device: str = "cpu") -> dict:
    """Random q (a strided view, as the model passes it), caches and out-of-order block
    tables whose columns past each context hold random valid block ids."""
    g = torch.Generator().manual_seed(seed)
    ctx = [p + c for p, c in zip(prefixes, chunks, strict=True)]
    need = [-(-n // block) for n in ctx]
    width = width or max(need)
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.randint(0, num_blocks, (len(ctx), width), generator=g)
    for b, k in enumerate(need):
        tables[b, :k] = torch.tensor(order[sum(need[:b]) : sum(need[:b]) + k])
    tokens = sum(chunks)
    qkv = torch.randn(tokens, heads + 2 * kv_heads, d, generator=g)
    cu = [0]
    for c in chunks:
        cu.append(cu[-1] + c)
    k_cache, v_cache = (torch.randn(num_blocks, block, kv_heads, d, generator=g).to(dtype)
                        for _ in range(2))
    return dict(
        q=qkv.to(dtype)[:, :heads].to(device), k_cache=k_cache.to(device),
        v_cache=v_cache.to(device), block_tables=tables.to(device),
        cu_seqlens_q=torch.tensor(cu, device=device), context_lens=torch.tensor(ctx, device=device),
        scale=d**-0.5, max_query_len=max(chunks), max_context_len=max(ctx), cu_host=cu)


def reference(case: dict, **kw) -> torch.Tensor:
    return paged_prefill_attention_ref(
        case["q"], case["k_cache"], case["v_cache"], case["block_tables"],
        case["cu_seqlens_q"], case["context_lens"], case["scale"], **kw)


def run_op(case: dict, backend: str = "torch", **kw) -> torch.Tensor:
    return paged_prefill_attention(
        case["q"], case["k_cache"], case["v_cache"], case["block_tables"],
        case["cu_seqlens_q"], case["context_lens"], case["scale"],
        max_query_len=case["max_query_len"], max_context_len=case["max_context_len"],
        backend=backend, cu_seqlens_q_host=case["cu_host"], **kw)


def random_mix(seed: int, batch: int = 5) -> tuple[list[int], list[int]]:
    """Prefixes 0..200 and chunks 1..64, always with one decode-like chunk of 1, one chunk with
    nothing cached, and one chunk that starts mid-block and crosses a block boundary."""
    rng = random.Random(seed)
    prefixes = [rng.randint(0, 200) for _ in range(batch - 3)] + [137, 0, 21]
    chunks = [rng.randint(1, 64) for _ in range(batch - 3)] + [1, rng.randint(2, 64), 30]
    return prefixes, chunks


# (sliding_window, softcap): windows shorter than every context and longer than all of them
OPTIONS = [(None, None), (7, None), (40, None), (1000, None), (None, 2.0), (24, 5.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (8, 2), (4, 4)])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("window,softcap", OPTIONS)
def test_torch_matches_reference(dtype, heads, kv_heads, d, window, softcap, monkeypatch):
    """Row blocks of 16 (default 128), so most chunks span several SDPA calls, each reading
    keys only up to its last row's position."""
    monkeypatch.setattr(paged_prefill_torch, "ROW_BLOCK", 16)
    case = make_case(*random_mix(d + heads + kv_heads), heads, kv_heads, d, dtype,
                     seed=heads * d)
    got = run_op(case, sliding_window=window, softcap=softcap)
    want = reference(case, sliding_window=window, softcap=softcap)
    assert got.shape == case["q"].shape and got.dtype == dtype
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])
    # with host context lengths each group gathers only up to its own longest context
    got = run_op(case, sliding_window=window, softcap=softcap,
                 context_lens_host=case["context_lens"].tolist())
    torch.testing.assert_close(got, want, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("seed", range(6))
def test_torch_random_batches(seed):
    """Random batch sizes (1..8), block sizes and table widths; out= is written; odd seeds
    without the host offsets (one padded group, layout derived on the device)."""
    rng = random.Random(seed)
    batch = rng.randint(1, 8)
    prefixes = [rng.randint(0, 200) for _ in range(batch)]
    chunks = [rng.randint(1, 64) for _ in range(batch)]
    block = rng.choice([8, 16, 32])
    need = max(-(-(p + c) // block) for p, c in zip(prefixes, chunks, strict=True))
    case = make_case(prefixes, chunks, 8, 2, 64, torch.float32, width=need + rng.randint(0, 9),
                     seed=seed, block=block)
    if seed % 2:
        case["cu_host"] = None
    out = torch.full_like(case["q"], float("nan"))
    assert run_op(case, out=out) is out
    torch.testing.assert_close(out, reference(case), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("host", [True, False])
def test_torch_long_chunks_cross_row_blocks(host):
    """Chunks longer than ROW_BLOCK (128), alone and mixed with decodes, with and without
    the host offsets: the causal bound on each block's keys holds for every row."""
    case = make_case([0, 40, 100, 7], [300, 1, 130, 1], 4, 2, 64, torch.float32, seed=8)
    if not host:
        case["cu_host"] = None
    torch.testing.assert_close(run_op(case), reference(case), rtol=2e-5, atol=2e-5)
    one = make_case([0], [260], 4, 2, 64, torch.float32, seed=9)
    torch.testing.assert_close(run_op({**one, "cu_host": None} if not host else one),
                               reference(one), rtol=2e-5, atol=2e-5)


def test_plan_groups_bounds_padding():
    """Decodes are not padded to a long chunk's length; similar lengths share a group; every
    group pads to at most twice its tokens."""
    assert paged_prefill_torch.plan_groups([1] * 8 + [256]) == [list(range(8)), [8]]
    assert paged_prefill_torch.plan_groups([30, 64, 40]) == [[0, 2, 1]]
    lens = [random.Random(s).randint(1, 512) for s in range(50)]
    groups = paged_prefill_torch.plan_groups(lens)
    assert sorted(b for g in groups for b in g) == list(range(50))
    for g in groups:
        assert len(g) * max(lens[b] for b in g) <= 2 * sum(lens[b] for b in g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (8, 2)])
def test_no_prefix_equals_causal_sdpa(dtype, heads, kv_heads):
    """Nothing cached: each chunk is a whole prompt and the op is plain causal attention
    (torch's SDPA, k/v repeated for the groups), for the reference and the backend alike."""
    chunks = [1, 16, 17, 50]
    case = make_case([0] * len(chunks), chunks, heads, kv_heads, 64, dtype, seed=5)
    cu, q = case["cu_host"], case["q"]
    keys, values = (_flat_context(case, cache) for cache in ("k_cache", "v_cache"))
    want = torch.empty_like(q)
    for b in range(len(chunks)):
        qs = q[cu[b] : cu[b + 1]].transpose(0, 1)[None].float()  # [1, H, l, d]
        ks, vs = (x[b][: chunks[b]].transpose(0, 1)[None].float()
                  .repeat_interleave(heads // kv_heads, 1) for x in (keys, values))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=case["scale"])
        want[cu[b] : cu[b + 1]] = o[0].transpose(0, 1).to(dtype)
    tol = TOL[dtype]
    torch.testing.assert_close(reference(case), want, rtol=tol, atol=tol)
    torch.testing.assert_close(run_op(case), want, rtol=tol, atol=tol)


def _flat_context(case: dict, name: str) -> list[torch.Tensor]:
    cache, tables = case[name], case["block_tables"]
    return [cache[tables[b]].reshape(-1, *cache.shape[2:]) for b in range(tables.shape[0])]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_chunks_equal_paged_decode(dtype):
    """Chunks of one token are decode steps: same as paged_decode_attention (and its
    reference), contexts 1..300 on a table wider than needed."""
    prefixes = [0, 14, 15, 16, 299, 40]
    case = make_case(prefixes, [1] * len(prefixes), 8, 2, 64, dtype, width=25, seed=9)
    args = (case["q"], case["k_cache"], case["v_cache"], case["block_tables"],
            case["context_lens"], case["scale"])
    got = run_op(case)
    tol = TOL[dtype]
    torch.testing.assert_close(got, paged_decode_attention(*args, backend="torch"),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(reference(case), paged_decode_attention_ref(*args),
                               rtol=tol, atol=tol)


class _GatherCount(TorchFunctionMode):
    """Counts the blocks gathered from 4-d tensors (KV caches) by index_select."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.index_select and args[0].dim() == 4:
            self.blocks += args[2].numel()
        return func(*args, **(kwargs or {}))


def test_torch_work_follows_real_context_not_table_width():
    """Contexts of at most 40 tokens read 3 blocks per sequence whether the table is 3 or 512
    columns wide (max_model_len 8192)."""
    counts = {}
    for width in (3, 512):
        case = make_case([20, 0, 39], [20, 5, 1], 8, 2, 64, torch.float32, width=width, seed=1)
        counter = _GatherCount()
        with counter:
            got = run_op(case)
        torch.testing.assert_close(got, reference(case), rtol=2e-5, atol=2e-5)
        counts[width] = counter.blocks
    assert counts == {3: 2 * 3 * 3, 512: 2 * 3 * 3}  # k and v, 3 sequences, 3 blocks each


def test_padding_rows_never_nan_with_a_short_window():
    """A window of 1 lets each query see only itself; short chunks next to a long one leave
    padding rows that must not poison real rows (an empty softmax row would be NaN)."""
    case = make_case([10, 50], [1, 40], 4, 2, 64, torch.float32, seed=2)
    got = run_op(case, sliding_window=1)
    assert not got.isnan().any()
    torch.testing.assert_close(got, reference(case, sliding_window=1), rtol=2e-5, atol=2e-5)
    # window 1: the output is the query's own value row
    v_own = torch.stack([_flat_context(case, "v_cache")[1][50 + j] for j in range(40)])
    torch.testing.assert_close(got[1:], v_own.repeat_interleave(2, 1), rtol=2e-5, atol=2e-5)


def test_checks_and_backend_names():
    case = make_case([3, 4], [2, 2], 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="cu_seqlens_q_host"):
        run_op({**case, "cu_host": [0, 2, 3]})
    with pytest.raises(ValueError, match="max_query_len"):
        run_op({**case, "max_query_len": 1})
    with pytest.raises(ValueError, match="flash"):
        run_op(case, backend="flash")
    torch.testing.assert_close(run_op(case, backend="auto"), reference(case))
    mask = paged_prefill_torch.prefill_attention_mask(torch.tensor([2, 2]),
                                                      case["context_lens"], 2, 16)
    assert mask.shape == (2, 1, 2, 16) and mask[0, 0].sum(-1).tolist() == [4, 5]


@pytest.fixture
def interpreter(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def check_kernel(case: dict, dtype: torch.dtype, **kw) -> None:
    case = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in case.items()}
    out = torch.full_like(case["q"], float("nan"))
    assert run_op(case, backend="triton", out=out, **kw) is out
    want = reference({k: v.cpu() if torch.is_tensor(v) else v for k, v in case.items()}, **kw)
    tol = KERNEL_TOL[dtype]
    torch.testing.assert_close(out.cpu(), want, rtol=tol, atol=tol)


KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@needs_triton
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 1), (8, 2), (4, 4)])
@pytest.mark.parametrize("window,softcap", [(None, None), (7, None), (None, 2.0), (24, 5.0)])
def test_triton_matches_reference(dtype, heads, kv_heads, window, softcap):
    """Mixed batch (a decode-like chunk, a whole prompt, chunks mid-block and across tiles of
    queries) at d=64: causal offsets, GQA rows, window edges, softcap."""
    case = make_case([0, 37, 5, 100], [20, 1, 40, 3], heads, kv_heads, 64, dtype, width=12,
                     seed=heads + kv_heads)
    check_kernel(case, dtype, sliding_window=window, softcap=softcap)


@needs_triton
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_head_dim_128_and_long_prefix(dtype):
    """d=128 (other tile sizes), a 200-token prefix and a window longer than the context."""
    case = make_case([200, 3], [17, 64], 8, 2, 128, dtype, seed=4)
    check_kernel(case, dtype, sliding_window=1000)


@needs_triton
@pytest.mark.usefixtures("interpreter")
@pytest.mark.parametrize("block", [8, 32])
def test_triton_block_sizes_and_int32_metadata(block):
    case = make_case([9, 70], [30, 2], 4, 2, 64, torch.float32, seed=block, block=block)
    case = {**case, **{k: case[k].int() for k in ("block_tables", "cu_seqlens_q",
                                                  "context_lens")}}
    check_kernel(case, torch.float32, sliding_window=20)


@needs_triton
@pytest.mark.usefixtures("interpreter")
def test_triton_decode_chunks_equal_decode_kernel():
    from loraplex.ops import paged_attention_triton

    case = make_case([0, 15, 16, 60], [1] * 4, 8, 2, 64, torch.float32, width=6, seed=3)
    args = (case["q"], case["k_cache"], case["v_cache"], case["block_tables"],
            case["context_lens"], case["scale"])
    args = tuple(a.to(DEVICE) if torch.is_tensor(a) else a for a in args)
    want = paged_attention_triton.paged_decode_attention(*args)
    got = run_op({k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in case.items()},
                 backend="triton")
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


@needs_triton
@pytest.mark.usefixtures("interpreter")
def test_triton_checks_inputs():
    case = make_case([3, 4], [2, 2], 4, 2, 48, torch.float32)
    with pytest.raises(ValueError, match="head_dim 48"):
        run_op(case, backend="triton")
    case = make_case([3, 4], [2, 2], 4, 2, 64, torch.float32)
    with pytest.raises(ValueError, match="sliding_window"):
        run_op(case, backend="triton", sliding_window=0)


def test_kernel_compiles_for_hopper():
    """The launches the wrapper makes for real layer shapes (Llama 1B/8B, d 32 and 256, with
    and without softcap) compile to sm_90 cubins without spills in bfloat16. No GPU needed
    (Triton ships ptxas); a subprocess, because this module's kernel is interpreted."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "loraplex.ops.paged_prefill_aot", "--quick"],
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if "paged_prefill_kernel" in line]
    assert len(lines) == 8 and sum("'HEAD_DIM': 128" in x for x in lines) == 2, proc.stdout
    assert sum("'HEAD_DIM': 64" in x for x in lines) == 2, proc.stdout
    assert all("stack=0 " in line or "stack=None " in line for line in lines), proc.stdout
