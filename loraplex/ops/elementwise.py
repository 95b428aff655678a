"""Where the fused elementwise kernels (``elementwise_triton``) run: on CUDA tensors when
Triton is installed, unless ``LORAPLEX_FUSED_ELEMENTWISE=0`` (to compare against, or to rule
them out). Everywhere else the layers run their torch code, which is the reference (CPU
results stay bit-identical to Hugging Face's)."""

from __future__ import annotations

import functools
import importlib.util
import os
from types import ModuleType

import torch


@functools.cache
def _has_triton() -> bool:
    if os.environ.get("LORAPLEX_FUSED_ELEMENTWISE", "1") == "0":
        return False
    return importlib.util.find_spec("triton") is not None


def fused_ops(x: torch.Tensor) -> ModuleType | None:
    """The ``elementwise_triton`` module when ``x`` is on CUDA and Triton imports, else None."""
    if not x.is_cuda or not _has_triton():
        return None
    from loraplex.ops import elementwise_triton

    return elementwise_triton
