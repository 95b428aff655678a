"""LoRA op backends: name -> (lora_shrink, lora_expand) with one contract (written as PyTorch
code in ``lora_ref``, the tests' reference).

``"torch"`` is ``lora_torch`` (any device; what the engine runs on CPU); ``"triton"`` is the GPU
kernels (``lora_triton``). ``"auto"`` picks Triton on CUDA when it is installed, else torch.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from typing import NamedTuple

import torch

BACKENDS = ("torch", "triton")


class LoRAOps(NamedTuple):
    shrink: Callable[..., None]  # (x, a, ranks, batch, out)
    expand: Callable[..., None]  # (h, b, ranks, scalings, offsets, batch, y)


def resolve_lora_backend(backend: str, device: torch.device | str) -> str:
    """``backend`` ("torch" | "triton" | "auto") -> the concrete backend for ``device``."""
    device = torch.device(device)
    has_triton = importlib.util.find_spec("triton") is not None
    if backend == "auto":
        return "triton" if device.type == "cuda" and has_triton else "torch"
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
    else:
        raise ValueError(f"lora_backend={backend!r} must be one of {BACKENDS}")
    return LoRAOps(mod.lora_shrink, mod.lora_expand)
