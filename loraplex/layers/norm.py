"""RMSNorm, computed in float32 exactly as Hugging Face Llama does; optionally fused with the
residual add that precedes it. On CUDA one Triton kernel (``ops/elementwise_triton``), on CPU
float32 one C pass (``ops/elementwise.cpu_rms_norm``)."""

from __future__ import annotations

from types import ModuleType

import torch
from torch import nn

from loraplex.ops.elementwise import cpu_rms_norm, fused_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self._fused(x)
        if ops is not None:
            return ops.rms_norm(x, self.weight, self.eps)
        out = cpu_rms_norm(x, self.weight, self.eps)
        return out if out is not None else self._torch(x)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual); the sum is written into ``x`` (a fresh sublayer
        output), so no [T, hidden] buffer is allocated for it."""
        ops = self._fused(x)
        if ops is not None:
            return ops.rms_norm(x, self.weight, self.eps, residual=residual), x
        out = cpu_rms_norm(x, self.weight, self.eps, residual)
        if out is not None:
            return out, x
        x = x.add_(residual)  # a + b is b + a bit for bit
        return self._torch(x), x

    def _fused(self, x: torch.Tensor) -> ModuleType | None:
        # The kernel multiplies by the weight in x's dtype, as the torch path does when the
        # weight has the model's dtype (it always has after loading).
        ok = x.dim() == 2 and x.stride(1) == 1 and self.weight.dtype == x.dtype
        return fused_ops(x) if ok else None

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return x.to(dtype).mul_(self.weight)  # a fresh tensor: w * x in place, same bits


class GemmaRMSNorm(nn.Module):
    """Gemma's RMSNorm: the weight is stored as an offset from 1 and applied in float32,
    before the cast back (Llama casts first). Plain torch: the fused kernel is Llama's."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(hidden), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)
