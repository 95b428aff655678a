"""Rotary position embedding (half-split layout, as in Hugging Face Llama), with Llama-3
and linear frequency scaling. cos/sin are tabulated once in float32 and indexed by position.

``ApplyRotary`` is one attention layer's use of them: a module of its own, so that code which
fuses work into the rotary's pass can replace it per layer (the LoRA path: the qkv
projection's expand, ``lora/layers.LoRARotary``), as ``LlamaModel.rotary_neighbours``
describes."""

from __future__ import annotations

import math

import torch
from torch import nn

from loraplex.config import RopeConfig
from loraplex.ops.elementwise import cpu_rotary_, fused_ops


def inv_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.scaling_type == "linear":  # positions slowed by `factor` (Gemma 3 global layers)
        return inv / rope.factor
    if rope.scaling_type != "llama3":
        return inv
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly.
    low_wavelen = rope.original_max_position / rope.low_freq_factor
    high_wavelen = rope.original_max_position / rope.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
    smooth = (rope.original_max_position / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """The cos/sin tables; the model calls ``lookup`` once per forward and each attention
    layer ``rotate``s its q/k with the result (there is no per-layer forward)."""

    def __init__(self, head_dim: int, max_position: int, rope: RopeConfig) -> None:
        super().__init__()
        inv = inv_frequencies(head_dim, rope)
        freqs = torch.arange(max_position, dtype=torch.float32)[:, None] * inv[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_position, head_dim]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def lookup(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, d] for ``positions`` [T]; the model looks them up once per forward."""
        return (self.cos[positions].to(dtype)[:, None, :],
                self.sin[positions].to(dtype)[:, None, :])

    @staticmethod
    def rotate_(cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``rotate`` into ``x`` when it can (one Triton kernel on CUDA: float32 math, rounded
        once, so half-precision results differ from ``rotate`` within one rounding; one C pass
        on CPU float32, bit for bit ``rotate``'s), else ``rotate``'s fresh tensor. Callers use
        the result, not ``x``."""
        ops = fused_ops(x)
        if ops is not None and x.dim() == 3 and x.stride(2) == 1:
            return ops.rotary_(x, *cos_sin)
        out = cpu_rotary_(x, *cos_sin)
        return out if out is not None else RotaryEmbedding.rotate(cos_sin, x)

    @staticmethod
    def rotate(cos_sin: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """x [T, any heads, d] -> x * cos + rotate_half(x) * sin."""
        cos, sin = cos_sin
        return x * cos + rotate_half(x) * sin


class ApplyRotary(nn.Module):
    """One attention layer's rotary: ``forward(rope, x) = RotaryEmbedding.rotate_(rope, x)``
    (see the module doc for why it is a module)."""

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return RotaryEmbedding.rotate_(rope, x)
