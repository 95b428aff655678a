"""LoRA op backends: name -> (lora_shrink, lora_expand) with one contract (written as PyTorch
code in ``lora_ref``, the tests' reference), plus optionally the gate/up expand fused into the
activation (``LoRAOps.expand_silu_mul``: the same math as expand, then SiLU-and-multiply) and
the expand and shrink on either side of an RMSNorm fused into it (``LoRAOps.add_rms_norm``),
and the qkv expand fused into the rotary embedding that reads its output (``LoRAOps.rotary``).

``"torch"`` is ``lora_torch`` (any device); ``"cpu"`` is ``lora_cpu`` (float32 in C, built at
first use; other dtypes run the torch code); ``"triton"`` is the GPU kernels (``lora_triton``).
``"auto"`` picks Triton on CUDA when it is installed, ``"cpu"`` on CPU when its C library
builds here (else ``"torch"``, with a log line saying why).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("torch", "cpu", "triton")


class LoRAOps(NamedTuple):
    shrink: Callable[..., None]  # (x, a, ranks, batch, out)
    expand: Callable[..., None]  # (h, b, ranks, scalings, offsets, batch, y)
    # Optional: the gate/up expand fused into the SiLU-and-multiply that reads its output,
    # (h, b, ranks, scalings, offsets, batch, y, col_scales) -> [T, I] or None where it does
    # not apply (``lora_cpu.lora_expand_silu_mul``); None for backends without one.
    expand_silu_mul: Callable[..., torch.Tensor | None] | None = None
    # Optional: RMSNorm with its residual add, the expand of the projection before it and the
    # shrink of the one after it in the same pass, (x, residual, weight, eps, batch, before,
    # then) -> [T, hidden] or None where it does not apply (``lora_cpu.lora_add_rms_norm``).
    add_rms_norm: Callable[..., torch.Tensor | None] | None = None
    # Optional: the rotary embedding in place with the expand of the projection whose output it
    # reads (qkv) first, (x, cos, sin, batch, before, y) -> x or None where it does not apply
    # (``lora_cpu.lora_rotary_``).
    rotary: Callable[..., torch.Tensor | None] | None = None


def resolve_lora_backend(backend: str, device: torch.device | str) -> str:
    """``backend`` ("torch" | "cpu" | "triton" | "auto") -> the concrete backend for
    ``device``."""
    device = torch.device(device)
    has_triton = importlib.util.find_spec("triton") is not None
    if backend == "auto":
        if device.type == "cuda" and has_triton:
            return "triton"
        if device.type == "cpu":
            from loraplex.ops.lora_cpu import unavailable_reason

            why = unavailable_reason()
            if why is None:
                return "cpu"
            logger.info("LoRA ops: the torch backend (the C one is unavailable: %s)", why)
        return "torch"
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"lora_backend='cpu' runs on the CPU, got device={device}")
        from loraplex.ops.lora_cpu import unavailable_reason

        why = unavailable_reason()
        if why is not None:
            raise ValueError(f"lora_backend='cpu' is unavailable here: {why}")
        return backend
    if backend == "triton":
        if not has_triton:
            raise ValueError("lora_backend='triton' needs the 'triton' package (not installed)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"lora_backend='triton' needs a CUDA device, got device={device}")
        return backend
    if backend != "torch":
        raise ValueError(f"lora_backend={backend!r} must be one of {(*BACKENDS, 'auto')}")
    return backend


def get_lora_ops(backend: str) -> LoRAOps:
    """The op pair of a concrete backend (see ``resolve_lora_backend``)."""
    if backend == "triton":
        from loraplex.ops import lora_triton as mod
    elif backend == "torch":
        from loraplex.ops import lora_torch as mod
    elif backend == "cpu":
        from loraplex.ops import lora_cpu as mod
    else:
        raise ValueError(f"lora_backend={backend!r} must be one of {BACKENDS}")
    return LoRAOps(mod.lora_shrink, mod.lora_expand, getattr(mod, "lora_expand_silu_mul", None),
                   getattr(mod, "lora_add_rms_norm", None), getattr(mod, "lora_rotary_", None))
