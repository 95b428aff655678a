"""Fused Triton (GPU) elementwise ops of the decoder layer: RMSNorm (optionally with the
residual add), rotary embedding of q/k in place, and SiLU(gate) * up. Each replaces 2-8
small torch kernels with one launch (at batch 1 under CUDA graphs launches, not bytes,
bound a decode step).

The torch code in ``layers/norm.py``, ``layers/rotary.py`` and ``models/llama.py`` stays the
CPU path and is the reference; each op's docstring gives its semantics as that PyTorch code.
Half-precision results may differ from the torch path within one rounding: torch rounds to
the dtype after every op, these kernels compute in float32 and round where noted.

CUDA graphs: no host syncs, the only allocation is the output through torch, and every grid
is a function of tensor shapes only. Under ``TRITON_INTERPRET=1`` they also run on CPU tensors
(the tests do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, n, eps, stride_x, stride_res, stride_out,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # Round the sum to the dtype first (as ``x.add_(residual)`` does), and normalize that.
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(x_ptr + row * stride_x + cols, x, mask=mask)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n
    normed = (xf * tl.math.rsqrt(var + eps)).to(x.dtype)  # HF: .to(dtype) before the weight
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, heads, half, stride_xt, stride_xh,
                   stride_cos, stride_sin, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    dmask = d < half
    mask = (h < heads)[:, None] & dmask[None, :]
    c1 = tl.load(cos_ptr + t * stride_cos + d, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + t * stride_cos + half + d, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + t * stride_sin + d, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + t * stride_sin + half + d, mask=dmask, other=0.0).to(tl.float32)
    p1 = x_ptr + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    p2 = p1 + half
    x1 = tl.load(p1, mask=mask, other=0.0)
    x2 = tl.load(p2, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    # rotate_half(x) = cat(-x2, x1)
    tl.store(p1, (x1f * c1[None, :] - x2f * s1[None, :]).to(x1.dtype), mask=mask)
    tl.store(p2, (x2f * c2[None, :] + x1f * s2[None, :]).to(x1.dtype), mask=mask)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, inter, stride_x, stride_out, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm of each row of ``x [T, hidden]`` with ``weight [hidden]`` (x's dtype) into
    ``out`` (a new ``[T, hidden]`` tensor when None), returned. With ``residual [T, hidden]``,
    ``x`` first becomes ``x + residual`` in place and that sum is normalized.
    Semantics as PyTorch code::

        if residual is not None:
            x.add_(residual)                      # rounded to x.dtype
        v = x.float()
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + eps)
        return v.to(x.dtype) * weight             # rounded before the weight multiply (HF)

    The float32 mean's summation order differs from torch's (float32 results agree within
    ~1e-6 relative; half precision within one rounding)."""
    _require(x.dtype in _DTYPES, f"rms_norm: x dtype {x.dtype}: fp16/bf16/fp32")
    _require(x.dim() == 2 and x.stride(1) == 1, "rms_norm: x [T, hidden], unit column stride")
    _require(weight.dtype == x.dtype and weight.shape == (x.shape[1],)
             and weight.is_contiguous(), "rms_norm: weight: contiguous [hidden], x's dtype")
    if residual is not None:
        _require(residual.dtype == x.dtype and residual.shape == x.shape
                 and residual.stride(1) == 1, "rms_norm: residual: [T, hidden] like x")
    _require(len({t.device for t in (x, weight, residual) if t is not None}) == 1,
             "rms_norm: tensors on one device")
    t, n = x.shape
    out = _output(out, x, (t, n), "rms_norm")
    if t == 0:
        return out
    block = triton.next_power_of_2(n)
    res = x if residual is None else residual
    _rms_norm_kernel[(t,)](
        x, res, weight, out, n, eps, x.stride(0), res.stride(0), out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_warps(block),
    )
    return out


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [T, heads, d]`` in place (neox half-split layout) and return it; ``cos``,
    ``sin`` are ``[T, 1, d]`` or ``[T, d]`` (the rows ``RotaryEmbedding.lookup`` gives, any
    float dtype). Semantics as PyTorch code (computed in float32, rounded once)::

        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        x.copy_(x.float() * cos.float() + rotated * sin.float())

    The torch path (``RotaryEmbedding.rotate``) rounds after each op in half precision, so
    half-precision results differ from it within bf16/fp16 rounding. ``x`` may be a strided
    view (q and k of the fused qkv output): rows and heads strided, the last dim contiguous."""
    _require(x.dtype in _DTYPES, f"rotary: x dtype {x.dtype}: fp16/bf16/fp32")
    _require(x.dim() == 3 and x.stride(2) == 1 and x.shape[2] % 2 == 0,
             "rotary: x [T, heads, d] with even d, unit last stride")
    t, heads, d = x.shape
    cos2, sin2 = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
    for name, c in (("cos", cos2), ("sin", sin2)):
        _require(c.shape == (t, d) and c.stride(1) == 1 and c.dtype in _DTYPES,
                 f"rotary: {name}: [T, 1, d] or [T, d] with unit last stride, float")
        _require(c.device == x.device, f"rotary: {name} on {c.device}, x on {x.device}")
    if t == 0 or heads == 0:
        return x
    block_d = triton.next_power_of_2(d // 2)
    block_h = max(1, min(triton.next_power_of_2(heads), 4096 // block_d))
    _rotary_kernel[(t, triton.cdiv(heads, block_h))](
        x, cos2, sin2, heads, d // 2, x.stride(0), x.stride(1), cos2.stride(0), sin2.stride(0),
        BLOCK_H=block_h, BLOCK_D=block_d, num_warps=4,
    )
    return x


def silu_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x [T, 2I]`` (gate | up, the merged gate_up output) -> ``out [T, I]`` (new if None).
    Semantics as PyTorch code (float32, rounded once; torch rounds silu's result first)::

        gate, up = x.float().chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up).to(x.dtype)
    """
    _require(x.dtype in _DTYPES, f"silu_mul: x dtype {x.dtype}: fp16/bf16/fp32")
    _require(x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 2 == 0,
             "silu_mul: x [T, 2I], unit column stride")
    t, inter = x.shape[0], x.shape[1] // 2
    out = _output(out, x, (t, inter), "silu_mul")
    if t == 0 or inter == 0:
        return out
    block = min(1024, triton.next_power_of_2(inter))
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](
        x, out, inter, x.stride(0), out.stride(0), BLOCK=block, num_warps=4,
    )
    return out


def _output(out: torch.Tensor | None, x: torch.Tensor, shape: tuple[int, int],
            op: str) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device)
    _require(out.shape == shape and out.dtype == x.dtype and out.device == x.device
             and out.stride(1) == 1, f"{op}: out: {list(shape)} in x's dtype, unit col stride")
    return out


def _warps(block: int) -> int:
    # ~8 elements per thread for one row held in registers: 1 warp for 256, 16 for 4096+.
    return max(1, min(16, block // 256))


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(f"elementwise_triton: {what}")
