"""Shared by the tests of the C library's fused CPU ops (``ops/lora_cpu.c``): whether it can
run here (the ``torch_threads`` fixture they use is in conftest.py)."""

from __future__ import annotations

import shutil
import sys

import pytest

from loraplex.ops import lora_cpu

CAN_BUILD = sys.platform.startswith("linux") and shutil.which("cc") is not None
needs_simd = pytest.mark.skipif(
    not CAN_BUILD or isinstance(lora_cpu._native(), str) or not lora_cpu._native().simd,
    reason="needs the C library and AVX-512")
