"""Qwen3: the Llama decoder with an RMSNorm over each query and key head (``q_norm``,
``k_norm``, over head_dim, before rotary) and no q/k/v bias."""

from __future__ import annotations

import torch

from loraplex.config import ModelConfig
from loraplex.layers.norm import RMSNorm
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.llama import LlamaAttention, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    rotary_reads_qkv = False  # q_norm / k_norm come first

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__(cfg, layer_idx)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, q + 2 * kv]
        t, d = x.shape[0], self.head_dim
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        # one row per head: the fused RMSNorm kernel's 2-D layout on CUDA; the norms' fresh
        # outputs are then rotated in place
        q = self.q_norm(q.reshape(-1, d)).view(t, self.heads, d)
        k = self.k_norm(k.reshape(-1, d)).view(t, self.kv_heads, d)
        q, k = RotaryEmbedding.rotate_(rope, q), RotaryEmbedding.rotate_(rope, k)
        return self.o_proj(self.attn(q, k, v.reshape(t, self.kv_heads, d)))


class Qwen3ForCausalLM(LlamaForCausalLM):
    attention_cls = Qwen3Attention
