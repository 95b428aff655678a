"""DoRA's per-slot column scales in ``lora_expand``: every backend (the float64 reference, the
CPU torch path, the masked torch path and the Triton kernels, interpreted without CUDA)
against a per-token float64 oracle written here, over adapter mixes where DoRA slots, plain
LoRA slots and base tokens share one batch."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

CUDA = torch.cuda.is_available()
_SAVED_FLAG = os.environ.get("TRITON_INTERPRET")
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels' @triton.jit runs

import importlib  # noqa: E402

from loraplex.ops import lora_cpu, lora_ref, lora_torch  # noqa: E402
from loraplex.ops.lora_meta import ColumnScales  # noqa: E402
from loraplex.ops.lora_testing import PATTERNS, LoRACase, build, poisoned_h  # noqa: E402

try:
    import triton  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction

    from loraplex.ops import lora_triton, lora_triton_kernels
    if not CUDA and not isinstance(lora_triton_kernels.expand_decode_kernel, InterpretedFunction):
        importlib.reload(lora_triton_kernels)  # imported earlier without the interpreter flag
except ImportError:  # pragma: no cover - triton is an optional GPU dependency
    lora_triton = None
if _SAVED_FLAG is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _SAVED_FLAG

DEVICE = "cuda" if CUDA else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 1e-2}


def column_scales(case: LoRACase, dora_slots: set[int], seed: int = 7) -> ColumnScales:
    """Random scale/shift for ``dora_slots`` on their targeted slices, identity elsewhere
    (the invariant the slot buffers keep)."""
    gen = torch.Generator().manual_seed(seed)
    s, out = case.b.shape[0], case.b.shape[1]
    scale, shift = torch.ones(s, out), torch.zeros(s, out)
    for slot in dora_slots:
        for i, r in enumerate(case.ranks[slot].tolist()):
            if r:
                c0, c1 = case.offsets[i], case.offsets[i + 1]
                scale[slot, c0:c1] = 0.5 + torch.rand(c1 - c0, generator=gen)
                shift[slot, c0:c1] = torch.randn(c1 - c0, generator=gen)
    flags = [i in dora_slots for i in range(s)]
    dev = case.b.device
    return ColumnScales(scale.to(dev), shift.to(dev),
                        torch.tensor(flags, dtype=torch.int32, device=dev), flags)


def oracle(case: LoRACase, h: torch.Tensor, y: torch.Tensor, cs: ColumnScales) -> torch.Tensor:
    """float64, one token at a time: DoRA slots map their base output, then add the delta."""
    ref = y.detach().cpu().double().clone()
    big_r, offs = case.max_rank, case.offsets
    h64, b = h.cpu().double(), case.b.cpu().double()
    scale, shift = cs.scale.cpu().double(), cs.shift.cpu().double()
    for tok, slot in enumerate(case.token_lora_slots):
        if slot < 0:
            continue
        for i, r in enumerate(case.ranks[slot].tolist()):
            if r == 0:
                continue
            c0, c1 = offs[i], offs[i + 1]
            if cs.host_flags[slot]:
                ref[tok, c0:c1] = ref[tok, c0:c1] * scale[slot, c0:c1] + shift[slot, c0:c1]
            delta = b[slot, c0:c1, :r] @ h64[tok, i * big_r : i * big_r + r]
            ref[tok, c0:c1] += float(case.scalings[slot, i]) * delta
    return ref


def run_expand(expand, case: LoRACase, cs: ColumnScales, tol: float) -> None:
    t, out = len(case.token_lora_slots), case.b.shape[1]
    y0 = torch.randn(t, out, generator=torch.Generator().manual_seed(4))
    y0 = y0.to(case.x.device, case.x.dtype)
    y, h = y0.clone(), poisoned_h(case)
    expand(h, case.b, case.ranks, case.scalings, case.offsets, case.batch, y, cs)
    ref = oracle(case, h, y0, cs)
    got = y.cpu().double()
    assert not got.isnan().any(), "expand read a poisoned (unused) entry"
    base_rows = torch.tensor([s < 0 for s in case.token_lora_slots])
    assert torch.equal(y.cpu()[base_rows], y0.cpu()[base_rows]), "base rows changed"
    torch.testing.assert_close(got, ref, rtol=tol, atol=tol)
    # the scale really matters: without it the result differs
    if any(cs.host_flags[s] and case.ranks[s].any() for s in case.token_lora_slots if s >= 0):
        plain = oracle(case, h, y0, replace(cs, host_flags=[False] * len(cs.host_flags)))
        assert (plain - ref).abs().max() > 10 * tol


def _cases(dtype, device):
    for n in (1, 2, 3):
        for pattern in PATTERNS:
            case = build(n, 7 if pattern in ("distinct", "some_none") else 16, pattern, 16,
                         seed=13 * n + len(pattern), dtype=dtype, device=device)
            yield case, column_scales(case, {0, 2, 3})


@pytest.mark.parametrize("backend", ["ref", "torch", "cpu", "torch_masked"])
def test_torch_backends_apply_column_scales(backend):
    for case, cs in _cases(torch.float32, "cpu"):
        if backend == "ref":
            run_expand(lora_ref.lora_expand, case, cs, 1e-6)
        elif backend in ("torch", "cpu"):
            run_expand((lora_torch if backend == "torch" else lora_cpu).lora_expand, case, cs,
                       1e-4)
        else:  # ranks off the host take the masked, sync-free path: force it on CPU
            run_expand(lambda *a: lora_torch._expand_masked(*a[:7], a[7]), case, cs, 1e-4)


def test_cpu_fused_activation_applies_column_scales():
    """The C backend's gate/up expand fused into the activation (``lora_expand_silu_mul``):
    DoRA slots map their base output first, as the unfused expand does."""
    lib = lora_cpu._native()
    if isinstance(lib, str) or not lib.simd:
        pytest.skip("needs the C library and AVX-512")
    for pattern in PATTERNS:
        case = build(2, 16, pattern, 16, seed=len(pattern), widths=(40, 40))
        cs = column_scales(case, {0, 2, 3})
        t = len(case.token_lora_slots)
        y0 = torch.randn(t, 80, generator=torch.Generator().manual_seed(4))
        y, h = y0.clone(), poisoned_h(case)
        out = lora_cpu.lora_expand_silu_mul(h, case.b, case.ranks, case.scalings,
                                            case.offsets, case.batch, y, cs)
        g, u = oracle(case, h, y0, cs).chunk(2, dim=-1)
        torch.testing.assert_close(out.double(), g / (1 + torch.exp(-g)) * u, rtol=1e-4,
                                   atol=1e-4)


def test_torch_without_dora_slots_is_plain_lora():
    """Column scales installed but no slot flagged: bit-identical to passing none."""
    for case, cs in _cases(torch.float32, "cpu"):
        cs = column_scales(case, set())
        t, out = len(case.token_lora_slots), case.b.shape[1]
        y0 = torch.randn(t, out, generator=torch.Generator().manual_seed(2))
        h = poisoned_h(case)
        y1, y2 = y0.clone(), y0.clone()
        lora_torch.lora_expand(h, case.b, case.ranks, case.scalings, case.offsets, case.batch, y1)
        lora_torch.lora_expand(h, case.b, case.ranks, case.scalings, case.offsets, case.batch,
                               y2, cs)
        assert torch.equal(y1, y2)


@pytest.mark.skipif(lora_triton is None, reason="triton not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("path", ["decode", "segment"])
def test_triton_epilogue_applies_column_scales(monkeypatch, dtype, path):
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.setattr(lora_triton, "_num_sms", lambda device: 4)
    for case, cs in _cases(dtype, DEVICE):
        b = case.batch
        b = (replace(b, max_seg_len=min(b.max_seg_len, 1)) if path == "decode"
             else replace(b, max_seg_len=max(b.max_seg_len, 5) + 3))
        run_expand(lora_triton.lora_expand, replace(case, batch=b), cs, TOL[dtype])
