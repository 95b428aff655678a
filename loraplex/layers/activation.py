"""The gated MLP's activation, ``silu(gate) * up`` of a fused ``[T, 2I]`` gate|up output.

``gated_mlp(gate_up, down, x)`` is what a model's MLP calls: a gate/up projection module with
its own fused form of "project, activate, project down" (``gated_mlp_forward``) runs that. The
LoRA wrapper has one (``lora/layers.py``): on CPU it adds the gate/up LoRA delta inside the
activation's pass instead of rewriting the projection output first, and runs the down
projection's LoRA shrink in that pass too. Models stay unaware of LoRA.
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


def gated_mlp(gate_up: nn.Module, down: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``down(silu_and_mul(gate_up(x)))``, through ``gate_up.gated_mlp_forward(down, x)`` where
    ``gate_up`` has one."""
    fused = getattr(gate_up, "gated_mlp_forward", None)
    return fused(down, x) if fused is not None else down(silu_and_mul(gate_up(x)))
