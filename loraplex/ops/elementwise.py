"""Where the fused elementwise kernels run, unless ``LORAPLEX_FUSED_ELEMENTWISE=0`` (to compare
against, or to rule them out):

- on CUDA tensors, when Triton is installed: ``elementwise_triton`` (RMSNorm with its residual
  add, rotary embedding, the gated MLP's ``silu(gate) * up``);
- on CPU float32, on a CPU with AVX-512 where the C library builds (``lora_cpu.c``): the gated
  MLP's ``silu(gate) * up`` (``cpu_silu_mul``), one pass instead of torch's two, within 3 ulp of
  torch's (its own exp), and RMSNorm with its residual add (``cpu_rms_norm``), one pass over
  each row's sum instead of torch's five ops, within an ulp or two of torch's (the sum of
  squares is summed in another order), and the rotary embedding in place (``cpu_rotary_``),
  one pass instead of torch's six ops and their five fresh tensors, bit for bit torch's. The
  LoRA path fuses its deltas into the same kernels (``lora_cpu.lora_expand_silu_mul``,
  ``lora_cpu.lora_add_rms_norm``, ``lora_cpu.lora_rotary_``).

Everywhere else the layers run their torch code, which is the reference.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch


def enabled() -> bool:
    """False when ``LORAPLEX_FUSED_ELEMENTWISE=0``: every layer runs its torch code."""
    return os.environ.get("LORAPLEX_FUSED_ELEMENTWISE", "1") != "0"


@functools.cache
def _has_triton() -> bool:
    return enabled() and importlib.util.find_spec("triton") is not None


def fused_ops(x: torch.Tensor) -> ModuleType | None:
    """The ``elementwise_triton`` module when ``x`` is on CUDA and Triton imports, else None."""
    if not x.is_cuda or not _has_triton():
        return None
    from loraplex.ops import elementwise_triton

    return elementwise_triton


def cpu_silu_mul(gate_up: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` of ``gate_up = [gate | up]`` ``[T, 2I]`` in C, as a new ``[T, I]``
    tensor; None where that does not run (not CPU float32 with unit column stride, no C
    library or no AVX-512 here, or disabled), and the caller runs torch's ops."""
    if (gate_up.device.type != "cpu" or gate_up.dtype != torch.float32 or gate_up.dim() != 2
            or gate_up.stride(1) != 1 or gate_up.shape[1] % 2 or not enabled()):
        return None
    from loraplex.ops import lora_cpu

    lib = lora_cpu._native()
    if isinstance(lib, str) or not lib.simd:
        return None
    t, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(t, inter)
    if lib.silu_mul(torch.get_num_threads(), gate_up.data_ptr(), gate_up.stride(0), inter, t,
                    out.data_ptr(), out.stride(0)) != 0:
        return None
    return out


def cpu_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """RMSNorm of ``x + residual`` (of ``x`` without one) in C, as a new tensor, the sum
    written into ``x`` (``RMSNorm.add_forward``'s contract); None where that does not run (not
    CPU float32 rows with unit column stride and a float32 weight, no C library or no AVX-512
    here, or disabled), and the caller runs torch's ops. The norm alone of
    ``lora_cpu.lora_add_rms_norm``."""
    if x.device.type != "cpu" or not enabled():
        return None
    from loraplex.ops import lora_cpu

    return lora_cpu.lora_add_rms_norm(x, residual, weight, eps, None)


def cpu_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """The rotary embedding of ``x [T, heads, d]`` in C, in place (returns ``x``), bit for bit
    ``RotaryEmbedding.rotate``'s values; None where that does not run (not CPU float32 with
    unit last stride, tables not one row of ``d`` per token, no C library or no AVX-512 here,
    or disabled), and the caller runs torch's ops. The rotary alone of
    ``lora_cpu.lora_rotary_``."""
    if x.device.type != "cpu" or not enabled():
        return None
    from loraplex.ops import lora_cpu

    return lora_cpu.lora_rotary_(x, cos, sin, None)
