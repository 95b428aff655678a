"""The fused elementwise kernels (RMSNorm with and without the residual add, rotary, SiLU*up)
against the layers' torch code, which is the CPU path and the reference.

Without CUDA they run under the Triton interpreter (TRITON_INTERPRET=1, set here before the
kernels are defined) in float32 and float16; with CUDA, compiled, also in bfloat16. Hidden
sizes are not powers of two, rows are several, data random, outputs poisoned with NaN."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
_SAVED_FLAG = os.environ.get("TRITON_INTERPRET")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels' @triton.jit runs

triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from loraplex.config import RopeConfig  # noqa: E402
from loraplex.layers.norm import RMSNorm  # noqa: E402
from loraplex.layers.rotary import RotaryEmbedding  # noqa: E402
from loraplex.ops import elementwise, elementwise_triton  # noqa: E402

if not CUDA and not isinstance(elementwise_triton._rms_norm_kernel, InterpretedFunction):
    importlib.reload(elementwise_triton)  # imported earlier without the interpreter flag
if _SAVED_FLAG is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _SAVED_FLAG

DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16]
GPU_BF16 = pytest.param(torch.bfloat16, marks=pytest.mark.gpu)
# float32: summation order / FMA only. Half: one rounding of the output (torch rounds after
# every op, the kernels once), i.e. about one ulp: fp16 2^-11, bf16 2^-8 relative.
TOL = {torch.float32: (1e-6, 1e-6), torch.float16: (2e-3, 1e-3), torch.bfloat16: (1.6e-2, 8e-3)}


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _randn(*shape: int, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype).to(DEVICE)


def _close(ours: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    rtol, atol = TOL[dtype]
    assert not ours.isnan().any(), "NaN left: some output was not written"
    torch.testing.assert_close(ours.float(), ref.float(), rtol=rtol, atol=atol * ref.abs().max())


def _norm(hidden: int, dtype: torch.dtype, seed: int) -> RMSNorm:
    norm = RMSNorm(hidden, 1e-5)
    norm.weight.data = _randn(hidden, dtype=dtype, seed=seed, scale=0.5) + 1
    return norm


@pytest.mark.parametrize("dtype", [*DTYPES, GPU_BF16])
@pytest.mark.parametrize("rows,hidden", [(1, 96), (5, 1000), (3, 64)])
def test_rms_norm(rows: int, hidden: int, dtype: torch.dtype) -> None:
    norm = _norm(hidden, dtype, seed=hidden)
    x = _randn(rows, hidden, dtype=dtype, seed=rows, scale=3.0)
    out = torch.full_like(x, float("nan"))
    got = elementwise_triton.rms_norm(x, norm.weight, norm.eps, out=out)
    assert got is out
    ref = norm._torch(x)
    _close(out, ref, dtype)
    if dtype != torch.float32:
        # Rounded to the dtype before the weight multiply, as torch/HF: only a float32 sum's
        # order apart, so almost every element is bit-equal (without that rounding ~25% differ).
        assert (out != ref).float().mean() <= 0.01


@pytest.mark.parametrize("dtype", [*DTYPES, GPU_BF16])
@pytest.mark.parametrize("rows,hidden", [(1, 96), (4, 1000)])
def test_add_rms_norm(rows: int, hidden: int, dtype: torch.dtype) -> None:
    """The sum is exactly ``x + residual`` in the dtype, written into x; the norm is of it."""
    norm = _norm(hidden, dtype, seed=hidden + 1)
    x = _randn(rows, hidden, dtype=dtype, seed=rows + 7)
    res = _randn(rows, hidden, dtype=dtype, seed=rows + 8, scale=2.0)
    want_sum = x + res
    out = torch.full_like(x, float("nan"))
    elementwise_triton.rms_norm(x, norm.weight, norm.eps, residual=res, out=out)
    assert torch.equal(x, want_sum)
    _close(out, norm._torch(want_sum), dtype)
    # bit for bit the norm of the rounded sum (the same kernel without the add), as add_ + norm
    assert torch.equal(out, elementwise_triton.rms_norm(want_sum, norm.weight, norm.eps))


def test_add_rms_norm_strided_rows() -> None:
    """Row strides of x, residual and out are honoured (views into wider buffers)."""
    dtype, hidden = torch.float32, 100
    norm = _norm(hidden, dtype, seed=3)
    xb = _randn(3, 130, dtype=dtype, seed=4)
    rb = _randn(3, 120, dtype=dtype, seed=5)
    ob = torch.full((3, 110), float("nan"), dtype=dtype, device=DEVICE)
    x, res, out = xb[:, :hidden], rb[:, 10:10 + hidden], ob[:, :hidden]
    want_sum, untouched = x + res, xb[:, hidden:].clone()
    elementwise_triton.rms_norm(x, norm.weight, norm.eps, residual=res, out=out)
    assert torch.equal(x, want_sum) and torch.equal(xb[:, hidden:], untouched)
    assert ob[:, hidden:].isnan().all()
    _close(out, norm._torch(want_sum), dtype)


def _rotary_ref(cos_sin, x: torch.Tensor) -> torch.Tensor:
    return RotaryEmbedding.rotate(cos_sin, x)


@pytest.mark.parametrize("dtype", [*DTYPES, GPU_BF16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 2, 16), (3, 1, 96), (8, 8, 8)])
def test_rotary_on_fused_qkv(heads: int, kv_heads: int, head_dim: int, dtype) -> None:
    """q and k of a fused qkv output rotated in place as one strided view; v untouched."""
    rows = 5
    rope = RotaryEmbedding(head_dim, 4096, RopeConfig(theta=10000.0)).to(DEVICE)
    positions = torch.tensor([0, 1, 7, 300, 4095], device=DEVICE)
    cos_sin = rope.lookup(positions, dtype)
    qkv = _randn(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=head_dim, scale=2)
    q_kv = heads + kv_heads
    qk = qkv[:, : q_kv * head_dim].view(rows, q_kv, head_dim)
    want, v = _rotary_ref(cos_sin, qk), qkv[:, q_kv * head_dim :].clone()
    got = elementwise_triton.rotary_(qk, *cos_sin)
    assert got.data_ptr() == qkv.data_ptr()
    _close(qk, want, dtype)
    assert torch.equal(qkv[:, q_kv * head_dim :], v)


def test_rotary_general_cos_sin() -> None:
    """Arbitrary cos/sin rows (halves differ), [T, d] layout: each half reads its own half."""
    rows, heads, d, dtype = 3, 5, 12, torch.float32
    cos, sin = _randn(rows, d, dtype=dtype, seed=1), _randn(rows, d, dtype=dtype, seed=2)
    x = _randn(rows, heads, d, dtype=dtype, seed=3)
    want = _rotary_ref((cos[:, None], sin[:, None]), x)
    _close(elementwise_triton.rotary_(x, cos, sin), want, dtype)


@pytest.mark.parametrize("dtype", [*DTYPES, GPU_BF16])
@pytest.mark.parametrize("rows,inter", [(1, 96), (6, 1000), (2, 2500)])
def test_silu_mul(rows: int, inter: int, dtype: torch.dtype) -> None:
    gate_up = _randn(rows, 2 * inter, dtype=dtype, seed=inter, scale=3.0)
    gate, up = gate_up.chunk(2, dim=-1)
    want = F.silu(gate).mul_(up)  # LlamaMLP's torch path
    out = torch.full((rows, inter), float("nan"), dtype=dtype, device=DEVICE)
    assert elementwise_triton.silu_mul(gate_up, out=out) is out
    _close(out, want, dtype)


def test_wrappers_reject_bad_inputs() -> None:
    x = torch.zeros(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="weight"):
        elementwise_triton.rms_norm(x, torch.ones(8, dtype=torch.float16, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="unit"):
        elementwise_triton.silu_mul(torch.zeros(8, 2, device=DEVICE).t())
    with pytest.raises(ValueError, match="even d"):
        elementwise_triton.rotary_(torch.zeros(2, 1, 7, device=DEVICE),
                                   torch.zeros(2, 7), torch.zeros(2, 7))
    with pytest.raises(ValueError, match="out"):
        elementwise_triton.silu_mul(torch.zeros(2, 8, device=DEVICE),
                                    out=torch.zeros(2, 8, device=DEVICE))


def test_kernels_compile_for_sm90() -> None:
    """Every launch of real and odd layer shapes compiles for Hopper without spills (Triton's
    ptxas); a subprocess, because this module's kernels are interpreted."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "loraplex.ops.elementwise_aot"], env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if "_kernel" in line]
    for kernel in ("_rms_norm_kernel", "_rotary_kernel", "_silu_mul_kernel"):
        assert sum(kernel in line for line in lines) >= 3, proc.stdout
    assert all("stack=0 " in line or "stack=None " in line for line in lines), proc.stdout


def test_cpu_tensors_keep_the_torch_path() -> None:
    """No Triton kernel for CPU tensors (on CPU float32 only SiLU*up has one, in C:
    ``elementwise.cpu_silu_mul``, tested in test_lora_cpu.py)."""
    assert elementwise.fused_ops(torch.zeros(2)) is None


def test_model_wiring_matches_torch_path(tmp_path, monkeypatch) -> None:
    """The whole model with every fused op (forced on CPU tensors under the interpreter;
    natural on CUDA): residual flow, in-place rotary on the qkv view, SiLU*up and the final
    add+norm give the torch path's logits (float32), and the torch path still matches
    transformers."""
    from helpers_lora import make_tiny_model

    from loraplex import LLM
    from loraplex.layers import activation, norm, rotary

    d, hf = make_tiny_model(tmp_path / "llama", "llama")
    prompts = [[3, 17, 99, 4, 5, 6, 7], [42], [1, 2, 3]]
    torch_path = LLM(str(d), device="cpu").score(prompts)
    for module in (norm, rotary, activation):
        monkeypatch.setattr(module, "fused_ops", lambda x: elementwise_triton)
    fused = LLM(str(d), device=DEVICE, dtype="float32").score(prompts)
    for ids, ours, ref in zip(prompts, fused, torch_path, strict=True):
        with torch.no_grad():
            hf_logits = hf(torch.tensor([ids])).logits[0]
        assert (ref - hf_logits).abs().max() <= 1e-4 * hf_logits.abs().max()
        # (on CUDA the reference ran on CPU: cuBLAS sums in another order)
        assert (ours - ref).abs().max() <= (1e-4 if CUDA else 1e-5) * ref.abs().max()


@pytest.mark.gpu
def test_ops_capture_in_cuda_graph() -> None:
    """No host syncs and shape-only grids: a captured graph replays on new inputs."""
    dtype, rows, hidden, heads, d = torch.bfloat16, 4, 1000, 6, 64
    norm = _norm(hidden, dtype, seed=11)
    rope = RotaryEmbedding(d, 512, RopeConfig()).to(DEVICE)
    x = torch.empty(rows, hidden, dtype=dtype, device=DEVICE)
    res = torch.empty_like(x)
    qk = torch.empty(rows, heads, d, dtype=dtype, device=DEVICE)
    gu = torch.empty(rows, 2 * hidden, dtype=dtype, device=DEVICE)
    pos = torch.zeros(rows, dtype=torch.long, device=DEVICE)

    def step():
        cs = rope.lookup(pos, dtype)
        return (elementwise_triton.rms_norm(x, norm.weight, norm.eps, residual=res),
                elementwise_triton.rotary_(qk, *cs), elementwise_triton.silu_mul(gu))

    for t in (x, res, qk, gu):
        t.normal_()
    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    x0, r0 = _randn(rows, hidden, dtype=dtype, seed=1), _randn(rows, hidden, dtype=dtype, seed=2)
    q0 = _randn(rows, heads, d, dtype=dtype, seed=3)
    g0 = _randn(rows, 2 * hidden, dtype=dtype, seed=4)
    for t, v in ((x, x0), (res, r0), (qk, q0), (gu, g0)):
        t.copy_(v)
    pos.copy_(torch.tensor([3, 1, 100, 511]))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(x, x0 + r0)
    _close(outs[0], norm._torch(x0 + r0), dtype)
    _close(outs[1], RotaryEmbedding.rotate(rope.lookup(pos, dtype), q0), dtype)
    g, u = g0.chunk(2, dim=-1)
    _close(outs[2], F.silu(g).mul_(u), dtype)
