"""The gated MLP's activation, ``silu(gate) * up`` of a fused ``[T, 2I]`` gate|up output.

``gate_up_silu_mul(proj, x)`` is what a model's MLP calls: a projection module with its own
fused form of "project, then activate" (``silu_mul_forward``) runs that. The LoRA wrapper has
one (``lora/layers.py``): on CPU it adds the gate/up LoRA delta inside the activation's pass
instead of rewriting the projection output first. Models stay unaware of LoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.ops.elementwise import cpu_silu_mul, fused_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]``: one kernel on CUDA
    (``elementwise_triton``) and on CPU float32 (C, ``elementwise.cpu_silu_mul``), else torch's
    ops (the product written into SiLU's output: one ``[T, I]`` buffer less)."""
    ops = fused_ops(gate_up)
    if ops is not None and gate_up.stride(1) == 1:
        return ops.silu_mul(gate_up)
    out = cpu_silu_mul(gate_up)
    if out is not None:
        return out
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def gate_up_silu_mul(proj: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``silu_and_mul(proj(x))``, through ``proj.silu_mul_forward(x)`` where ``proj`` has one."""
    fused = getattr(proj, "silu_mul_forward", None)
    return fused(x) if fused is not None else silu_and_mul(proj(x))
