"""Paged decode attention: the Triton kernels and the torch path against the plain reference.

Without CUDA the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here before
they are defined; float32/float16 only, the interpreter gets bfloat16 dots wrong); with CUDA
they run compiled, bfloat16 included. Cases sweep contexts of 1/15/16/17 tokens and contexts
spread over several splits, GQA groups 1/4/8, head dims 64/128, block tables in random order
with garbage past each context, CUDA-graph padding rows, and NaN-poisoned outputs/scratch.
"""

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

from torch.overrides import TorchFunctionMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from loraplex.layers.attention import Attention  # noqa: E402
from loraplex.layers.forward_context import ForwardBatch, forward_context  # noqa: E402
from loraplex.ops import (  # noqa: E402
    paged_attention_kernels,
    paged_attention_torch,
    paged_attention_triton,
)
from loraplex.ops.paged_attention import resolve_attention_backend  # noqa: E402
from loraplex.ops.paged_attention_ref import paged_decode_attention_ref  # noqa: E402

if not CUDA and not isinstance(paged_attention_kernels.paged_decode_split_kernel,
                               InterpretedFunction):
    importlib.reload(paged_attention_kernels)  # imported earlier without the interpreter flag
if _SAVED_FLAG is None:  # the fixture below sets it per test, so it does not leak elsewhere
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _SAVED_FLAG

DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BLOCK = 16


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def make_case(lens: list[int], heads: int, kv_heads: int, d: int, dtype: torch.dtype,
              width: int | None = None, seed: int = 0, block: int = BLOCK,
              num_blocks: int | None = None):
    """Random q (a strided view, as the model passes it), caches and out-of-order block
    tables; table columns past each context hold random valid block ids."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // block) for n in lens]
    width = width or max(need)
    num_blocks = num_blocks or sum(need) + 5
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.randint(0, num_blocks, (len(lens), width), generator=g)
    for b, k in enumerate(need):
        tables[b, :k] = torch.tensor(order[sum(need[:b]) : sum(need[:b]) + k])
    qkv = torch.randn(len(lens), heads + 2 * kv_heads, d, generator=g)
    q = qkv.to(dtype)[:, :heads]  # [B, H, d], row stride (H + 2 KVH) d
    caches = [torch.randn(num_blocks, block, kv_heads, d, generator=g).to(dtype)
              for _ in range(2)]
    move = lambda t: t.to(DEVICE)  # noqa: E731
    return (move(q), *map(move, caches), move(tables), move(torch.tensor(lens)), d**-0.5)


def check(fn, case, dtype: torch.dtype) -> torch.Tensor:
    q = case[0]
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    got = fn(*case, out=out)
    assert got is out
    want = paged_decode_attention_ref(*case)
    torch.testing.assert_close(out, want, rtol=TOL[dtype], atol=TOL[dtype])
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (16, 2)])  # groups 1, 4, 8
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sms", [1, 132])  # 1: one split (direct store); 132: split + reduce
def test_triton_matches_reference(dtype, heads, kv_heads, d, sms, monkeypatch):
    monkeypatch.setattr(paged_attention_triton, "_num_sms", lambda device: sms)
    lens = [1, 15, 16, 17, 300]  # 300 tokens span several tiles, so several splits at 132 SMs
    case = make_case(lens, heads, kv_heads, d, dtype, width=20, seed=d + heads)
    tile = paged_attention_triton._tile_tokens(d, case[0].element_size())
    splits = paged_attention_triton.num_splits(len(lens), kv_heads, heads, d, 20 * BLOCK, tile,
                                               DEVICE)
    assert (splits == 1) == (sms == 1) and (sms == 1 or splits >= 3)
    if splits > 1:  # stale scratch must not leak: empty shares store neutral partials
        paged_attention_triton._scratch(DEVICE).fill_(float("nan"))
    check(paged_attention_triton.paged_decode_attention, case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_wide_table_and_graph_padding_rows(dtype):
    """As under CUDA graphs: a max_model_len-wide table (many splits, most shares empty), and
    padding rows with context 1 whose whole table row is the dummy block."""
    lens = [33, 1, 1, 5]
    case = list(make_case(lens, 8, 2, 64, dtype, width=64, seed=3))
    dummy = case[1].shape[0] - 1
    case[3][1:3] = dummy  # rows 1, 2: padding
    check(paged_attention_triton.paged_decode_attention, tuple(case), dtype)


@pytest.mark.parametrize("block", [8, 16, 32])
def test_triton_block_sizes(block):
    case = make_case([1, 40, 77], 8, 2, 64, torch.float32, seed=block, block=block)
    check(paged_attention_triton.paged_decode_attention, case, torch.float32)


def test_triton_int32_metadata_and_checks():
    """int32 block tables and lengths read the same; bad inputs raise before any launch."""
    case = list(make_case([5, 49], 8, 2, 64, torch.float32, seed=11))
    case[3], case[4] = case[3].int(), case[4].int()
    check(paged_attention_triton.paged_decode_attention, tuple(case), torch.float32)
    with pytest.raises(ValueError, match="head_dim 48"):
        q = torch.randn(2, 8, 48, device=DEVICE)
        kv = torch.randn(4, BLOCK, 2, 48, device=DEVICE)
        paged_attention_triton.paged_decode_attention(q, kv, kv, case[3], case[4], 1.0)
    with pytest.raises(ValueError, match="dtypes"):
        paged_attention_triton.paged_decode_attention(case[0].half(), *case[1:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (16, 2)])
def test_torch_path_matches_reference(dtype, heads, kv_heads):
    case = make_case([1, 15, 16, 17, 300], heads, kv_heads, 64, dtype, width=25, seed=heads)
    check(paged_attention_torch.paged_decode_attention, case, dtype)


class _GatherCount(TorchFunctionMode):
    """Counts the blocks gathered from 4-d tensors (KV caches) by index_select."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.index_select and args[0].dim() == 4:
            self.blocks += args[2].numel()
        return func(*args, **(kwargs or {}))


def _decode_layer(backend: str, table_width: int, lens: list[int], dtype=torch.float32):
    """One decode step of one Attention layer (writes the new k/v, then attends), as the
    static-buffer path runs it: the table is ``table_width`` wide, max_context_len is known."""
    heads, kv_heads, d = 8, 2, 64
    q, kc, vc, tables, ctx, _ = make_case(lens, heads, kv_heads, d, dtype, width=table_width)
    g = torch.Generator().manual_seed(7)
    k_new, v_new = (torch.randn(len(lens), kv_heads, d, generator=g).to(dtype).to(DEVICE)
                    for _ in range(2))
    slots = torch.tensor([int(tables[b, (n - 1) // BLOCK]) * BLOCK + (n - 1) % BLOCK
                          for b, n in enumerate(lens)], device=DEVICE)
    batch = ForwardBatch(is_prefill=False, num_tokens=len(lens), slot_mapping=slots,
                         block_tables=tables, context_lens=ctx, max_context_len=max(lens),
                         kv_caches=[(kc, vc)], attn_backend=backend)
    counter = _GatherCount()
    with forward_context(batch), counter:
        out = Attention(0, heads, kv_heads, d)(q, k_new, v_new)
    want = paged_decode_attention_ref(q, kc, vc, tables, ctx, d**-0.5)  # cache now holds k/v_new
    torch.testing.assert_close(out, want.reshape(out.shape), rtol=TOL[dtype], atol=TOL[dtype])
    return counter.blocks


def test_torch_decode_work_does_not_depend_on_table_width():
    """A 25-token context reads 2 blocks per sequence whether the static table is 16 or 512
    blocks wide (max_model_len 256 or 8192). The old code gathered every column."""
    lens = [25, 3, 18]
    counts = {w: _decode_layer("torch", w, lens) for w in (16, 512)}
    assert counts == {16: 2 * 2 * len(lens), 512: 2 * 2 * len(lens)}  # k and v, 2 blocks each


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_layer_triton_backend(dtype):
    """Attention wired to the Triton backend: cache write then the kernel, same as reference;
    the kernel gathers nothing."""
    assert _decode_layer("triton", 40, [25, 1, 70], dtype) == 0


def test_static_buffer_engine_decode_reads_real_width(tmp_path):
    """The engine's static-buffer decode path (DecodeGraphs, capture=False) hands attention
    only the columns the batch's contexts span, whatever max_model_len is."""
    from helpers_lora import make_tiny_model

    from loraplex import LLM, SamplingParams

    d, _ = make_tiny_model(tmp_path / "m", "llama", max_position_embeddings=512)
    sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    prompts = [list(range(3, 23)), list(range(5, 10))]  # 20 and 5 tokens
    seen = {}
    for max_len in (64, 512):
        llm = LLM(str(d), device="cpu", max_num_seqs=4, max_model_len=max_len, cuda_graphs=True)
        assert llm.engine.runner.graphs is not None
        counter = _GatherCount()
        with counter:
            tokens = [o.token_ids for o in llm.generate(prompts, sp)]
        seen[max_len] = (counter.blocks, tokens)
    # 2 decode steps (contexts 21, 22: 2 blocks) x layers x (k, v) x 2 rows x 2 blocks
    layers = llm.engine.model_config.num_layers
    assert seen[64][0] == seen[512][0] == 2 * layers * 2 * 2 * 2
    assert seen[64][1] == seen[512][1]


def test_kernels_compile_for_hopper():
    """The launches the wrapper makes for real layer shapes (Llama 1B/8B, d 32 and 256,
    one split and many) compile to sm_90 cubins without spills. No GPU needed (Triton ships
    ptxas); a subprocess, because this module's kernels are interpreted."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "loraplex.ops.paged_attention_aot", "--quick"],
                          env=env, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if "_kernel" in line]
    assert sum("split_kernel" in x for x in lines) >= 8 and any("reduce" in x for x in lines)
    assert all("stack=0 " in line or "stack=None " in line for line in lines), proc.stdout


def test_resolve_backend():
    cpu = torch.device("cpu")
    assert resolve_attention_backend("auto", cpu, torch.float32, 64) == "torch"
    assert resolve_attention_backend("torch", cpu, torch.float32, 64) == "torch"
    with pytest.raises(ValueError, match="flash"):
        resolve_attention_backend("flash", cpu, torch.float32, 64)
    assert not paged_attention_triton.supports(torch.float16, 80)
    assert not paged_attention_triton.supports(torch.int8, 64)
    if CUDA:
        cuda = torch.device("cuda")
        assert resolve_attention_backend("auto", cuda, torch.bfloat16, 128) == "triton"
        assert resolve_attention_backend("auto", cuda, torch.bfloat16, 80) == "torch"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_replays_in_cuda_graph(dtype):
    """Captured once with static buffers, replayed after new lengths and block tables are
    written into them (including padding rows), the graph gives the reference's output."""
    heads, kv_heads, d, width = 32, 8, 128, 64
    first = make_case([100, 1, 1, 1], heads, kv_heads, d, dtype, width=width, seed=1,
                      num_blocks=100)
    q, kc, vc, tables, ctx, scale = (t.clone() if torch.is_tensor(t) else t for t in first)
    out = torch.empty_like(q)
    fn = lambda: paged_attention_triton.paged_decode_attention(  # noqa: E731
        q, kc, vc, tables, ctx, scale, out)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    new = make_case([1000, 17, 16, 1], heads, kv_heads, d, dtype, width=width, seed=2,
                    num_blocks=100)
    for static, fresh in zip((q, kc, vc, tables, ctx), new):
        static.copy_(fresh)
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    want = paged_decode_attention_ref(q, kc, vc, tables, ctx, scale)
    torch.testing.assert_close(out, want, rtol=TOL[dtype], atol=TOL[dtype])
