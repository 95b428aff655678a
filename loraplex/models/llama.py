"""Llama-family decoder (Llama 2/3, Mistral with its sliding window; Qwen2 via
``attention_bias``), as a plain nn.Module; Qwen 3 and Phi-3 build on it.

Parameter names follow Hugging Face, with q/k/v fused into ``qkv_proj`` and gate/up into
``gate_up_proj`` (``packed_modules`` maps checkpoint names onto them).

Under tensor parallelism (``distributed/parallel_state``, read at construction) each rank
builds its shard: its query and kv heads, its MLP columns, its vocabulary rows of the
embedding and lm_head; ``compute_logits`` gathers the full vocabulary on every rank.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.config import ModelConfig
from loraplex.distributed.parallel_state import all_gather_last, tp_size
from loraplex.distributed.sharding import RankShape
from loraplex.errors import ModelLoadError
from loraplex.layers.activation import gated_mlp
from loraplex.layers.attention import Attention
from loraplex.layers.embedding import VocabParallelEmbedding
from loraplex.layers.linear import ColumnLinear, MergedColumnLinear, QKVLinear, RowLinear
from loraplex.layers.norm import RMSNorm
from loraplex.layers.rotary import ApplyRotary, RotaryEmbedding


class LlamaAttention(nn.Module):
    # the rotary (``self.rotate``) reads the qkv projection's output as it left the projection
    # (``LlamaModel.rotary_neighbours``); a subclass that changes q/k in between says False
    rotary_reads_qkv = True

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        local = RankShape.of(cfg, tp_size())  # this rank's heads
        self.heads, self.kv_heads, self.head_dim = local.num_heads, local.num_kv_heads, cfg.head_dim
        self.qkv_proj = QKVLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, bias=cfg.attention_bias
        )
        self.o_proj = RowLinear(cfg.q_size, cfg.hidden_size, bias=False)
        self.rotate = ApplyRotary()
        self.attn = Attention(layer_idx, self.heads, self.kv_heads, cfg.head_dim,
                              sliding_window=cfg.layer_window(layer_idx))

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """rope: this step's (cos, sin) rows, looked up once by the model."""
        qkv = self.qkv_proj(x)  # [T, q + 2 * kv]
        t, q_kv = x.shape[0], self.heads + self.kv_heads
        # q and k are adjacent in each row: rotate them as one [T, heads + kv_heads, d] view
        # (half the ops of rotating each; the same arithmetic per element)
        # (in place on CUDA and on CPU float32: one kernel into the fresh qkv output)
        qk = self.rotate(rope, qkv[:, : q_kv * self.head_dim].view(t, q_kv, -1))
        q, k = qk.split([self.heads, self.kv_heads], dim=1)
        v = qkv[:, q_kv * self.head_dim :].view(t, self.kv_heads, self.head_dim)
        o = self.attn(q, k, v)
        return self.o_proj(o)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ModelLoadError(f"hidden_act={cfg.hidden_act!r} is not supported for "
                                 f"{cfg.architecture} (only silu)")
        i = cfg.intermediate_size
        self.gate_up_proj = MergedColumnLinear(cfg.hidden_size, [i, i], ["gate", "up"])
        self.down_proj = RowLinear(i, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gated_mlp(self.gate_up_proj, self.down_proj, x)  # [T, H] -> [T, 2I] -> [T, H]


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int,
                 attention_cls: type[nn.Module] = LlamaAttention) -> None:
        super().__init__()
        self.self_attn = attention_cls(cfg, layer_idx)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output, not yet added to ``residual`` (at layer 0 the
        embeddings, with ``residual`` None) -> (this layer's MLP output, its residual).

        Each residual add is fused into the norm that follows it (one kernel on CUDA) and
        goes into the sublayer output, a fresh tensor (a + b is b + a bit for bit), so the
        sums are the same as adding after each sublayer and no [T, hidden] buffer is
        allocated for them."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_forward(x, residual)
        attn = self.self_attn(rope, h)
        h, residual = self.post_attention_layernorm.add_forward(attn, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, attention_cls: type[nn.Module] = LlamaAttention) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position, cfg.rope)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i, attention_cls)
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def norm_neighbours(self) -> list[tuple[str, str | None, str | None]]:
        """The residual stream's dataflow, for code that fuses work into a norm (the LoRA
        path: ``lora/layers.LoRANorm``): per RMSNorm, (its path, the projection whose output
        its residual add reads, the projection that reads its output), as paths below this
        module; None for the embedding before the first norm and the logits after the last.
        A subclass whose forward moves a projection's output elsewhere must say so here."""
        links, prev = [], None
        for i in range(len(self.layers)):
            p = f"layers.{i}."
            links.append((p + "input_layernorm", prev, p + "self_attn.qkv_proj"))
            links.append((p + "post_attention_layernorm", p + "self_attn.o_proj",
                          p + "mlp.gate_up_proj"))
            prev = p + "mlp.down_proj"
        links.append(("norm", prev, None))
        return links

    def rotary_neighbours(self) -> list[tuple[str, str]]:
        """Per attention layer whose rotary reads the qkv projection's output unchanged
        (``rotary_reads_qkv``): (the rotary's path, the projection's path), for code that
        fuses work into the rotary's pass (``lora/layers.LoRARotary``)."""
        return [(f"layers.{i}.self_attn.rotate", f"layers.{i}.self_attn.qkv_proj")
                for i, layer in enumerate(self.layers)
                if getattr(layer.self_attn, "rotary_reads_qkv", False)]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(rope, x, residual)
        return self.norm(x) if residual is None else self.norm.add_forward(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    """input_ids [T], positions [T] (a flattened batch) -> hidden states [T, hidden]."""

    attention_cls: type[nn.Module] = LlamaAttention

    # checkpoint name -> (our fused module name, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = self.make_model(cfg)
        self.lm_head = ColumnLinear(cfg.hidden_size, cfg.vocab_size)
        self.vocab_parallel = tp_size() > 1  # lm_head holds this rank's vocabulary rows
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_model(self, cfg: ModelConfig) -> nn.Module:
        """The decoder stack (a subclass with other layers overrides this)."""
        return LlamaModel(cfg, self.attention_cls)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, hidden] -> float32 logits [T, vocab] (the full vocabulary, every rank)."""
        return self.gather_logits(self.lm_head(hidden)).float()

    def gather_logits(self, local: torch.Tensor) -> torch.Tensor:
        """This rank's vocabulary columns [T, ceil(V / tp)] -> [T, V] (padding cut off)."""
        if not self.vocab_parallel:
            return local
        full = all_gather_last(local)
        vocab = self.config.vocab_size
        return full if full.shape[-1] == vocab else full[:, :vocab].contiguous()
