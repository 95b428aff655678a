"""Gemma 2 and Gemma 3 (text-only) decoders, as plain nn.Modules.

Against Llama: the embeddings are scaled by sqrt(hidden) (rounded to the activation dtype,
as Hugging Face does), every RMSNorm multiplies by ``1 + w`` in float32, each sublayer is
wrapped in a pre- and a post-norm, the MLP is GeGLU (tanh GELU), scores are scaled by
``query_pre_attn_scalar ** -0.5``, sliding-window layers alternate with global ones
(``layer_types``), and the logits are soft-capped (``final_logit_softcapping``). Gemma 2 also
soft-caps the attention scores; Gemma 3 instead normalises each q/k head (``q_norm``,
``k_norm``) and gives its sliding layers their own RoPE base (``local_rope``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.config import ModelConfig
from loraplex.distributed.parallel_state import tp_size
from loraplex.distributed.sharding import RankShape
from loraplex.errors import ModelLoadError
from loraplex.layers.attention import Attention
from loraplex.layers.embedding import VocabParallelEmbedding
from loraplex.layers.linear import MergedColumnLinear, QKVLinear, RowLinear
from loraplex.layers.norm import GemmaRMSNorm
from loraplex.layers.rotary import RotaryEmbedding
from loraplex.models.llama import LlamaForCausalLM

Rope = tuple[torch.Tensor, torch.Tensor]


class GemmaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, qk_norm: bool) -> None:
        super().__init__()
        local = RankShape.of(cfg, tp_size())  # this rank's heads
        self.heads, self.kv_heads, self.head_dim = local.num_heads, local.num_kv_heads, cfg.head_dim
        self.qkv_proj = QKVLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, bias=cfg.attention_bias
        )
        self.o_proj = RowLinear(cfg.q_size, cfg.hidden_size, bias=cfg.attention_bias)
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        self.attn = Attention(layer_idx, self.heads, self.kv_heads, cfg.head_dim,
                              scale=scalar**-0.5, sliding_window=cfg.layer_window(layer_idx),
                              softcap=cfg.attn_logit_softcap)
        self.q_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = GemmaRMSNorm(cfg.head_dim, cfg.rms_norm_eps) if qk_norm else None

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)  # [T, q + 2 * kv]
        t, d = x.shape[0], self.head_dim
        q, k, v = qkv.split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q, k = q.reshape(t, self.heads, d), k.reshape(t, self.kv_heads, d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = RotaryEmbedding.rotate_(rope, q), RotaryEmbedding.rotate_(rope, k)  # fresh
        return self.o_proj(self.attn(q, k, v.reshape(t, self.kv_heads, d)))


class GemmaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise ModelLoadError(f"hidden_activation={cfg.hidden_act!r} is not supported for "
                                 f"{cfg.architecture} (only gelu_pytorch_tanh)")
        i = cfg.intermediate_size
        self.gate_up_proj = MergedColumnLinear(cfg.hidden_size, [i, i], ["gate", "up"])
        self.down_proj = RowLinear(i, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each
        return self.down_proj(F.gelu(gate, approximate="tanh").mul_(up))


class GemmaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, qk_norm: bool) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = GemmaAttention(cfg, layer_idx, qk_norm)
        self.mlp = GemmaMLP(cfg)
        self.input_layernorm = GemmaRMSNorm(h, eps)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        """x [T, hidden] (the residual stream) -> the same after this layer."""
        x = x + self.post_attention_layernorm(self.self_attn(rope, self.input_layernorm(x)))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, qk_norm: bool) -> None:
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope)
        # Gemma 3's sliding layers rotate with their own base; one table per distinct RoPE
        self.local_rotary = (RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.local_rope)
                             if cfg.local_rope is not None else None)
        self.local_layers = [cfg.local_rope is not None and cfg.layer_window(i) is not None
                             for i in range(cfg.num_layers)]
        self.layers = nn.ModuleList(GemmaDecoderLayer(cfg, i, qk_norm)
                                    for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # the normalizer is rounded to the activation dtype first (bf16 sqrt(3072) = 55.5)
        x = x * torch.tensor(self.hidden_size**0.5, dtype=x.dtype)
        rope = self.rotary.lookup(positions, x.dtype)
        local = self.local_rotary.lookup(positions, x.dtype) if self.local_rotary else None
        for layer, is_local in zip(self.layers, self.local_layers, strict=True):
            x = layer(local if is_local else rope, x)
        return self.norm(x)


class Gemma2ForCausalLM(LlamaForCausalLM):
    """input_ids [T], positions [T] (a flattened batch) -> hidden states [T, hidden]; Llama's
    wrapper over the Gemma decoder stack, with the final logit softcap."""

    qk_norm = False

    def make_model(self, cfg: ModelConfig) -> nn.Module:
        return GemmaModel(cfg, self.qk_norm)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.gather_logits(self.lm_head(hidden)).float()
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = logits.div_(cap).tanh_().mul_(cap)
        return logits


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
