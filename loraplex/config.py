"""Frozen, validated configuration: the model's shape, and the engine's limits."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from loraplex.errors import ModelLoadError


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    # Llama-3 style scaling ("llama3"); None means plain RoPE.
    scaling_type: str | None = None
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only model, read from a Hugging Face ``config.json``."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_norm_eps: float
    rope: RopeConfig
    tie_word_embeddings: bool
    attention_bias: bool
    dtype: torch.dtype  # the checkpoint's dtype
    eos_token_ids: tuple[int, ...] = ()
    sliding_window: int | None = None  # Mistral/Qwen2 windowed attention, when enabled

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def proj_shapes(self) -> dict[str, tuple[int, int]]:
        """HF projection name -> (in_features, out_features): the LoRA targets per layer."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_size),
            "k_proj": (h, self.kv_size),
            "v_proj": (h, self.kv_size),
            "o_proj": (self.q_size, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @classmethod
    def from_hf(cls, hf) -> ModelConfig:
        """Build from a ``transformers.PretrainedConfig`` (v4 or v5 rope fields)."""
        arch = (getattr(hf, "architectures", None) or [type(hf).__name__])[0]
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        rope_params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None)
        rope_params = dict(rope_params or {})
        theta = rope_params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        rtype = rope_params.get("rope_type", rope_params.get("type", "default"))
        if rtype not in ("default", "llama3", None):
            raise ModelLoadError(
                f"rope type {rtype!r} is not supported (supported: default, llama3)"
            )
        rope = RopeConfig(theta=float(theta))
        if rtype == "llama3":
            rope = RopeConfig(
                theta=float(theta),
                scaling_type="llama3",
                factor=float(rope_params["factor"]),
                low_freq_factor=float(rope_params.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope_params.get("high_freq_factor", 4.0)),
                original_max_position=int(
                    rope_params.get("original_max_position_embeddings", 8192)
                ),
            )
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = (
            tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        )
        dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or torch.float32
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        return cls(
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            max_position=getattr(hf, "max_position_embeddings", 2048),
            rms_norm_eps=hf.rms_norm_eps,
            rope=rope,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf, "attention_bias", False)) or arch.startswith("Qwen2"),
            dtype=dtype,
            eos_token_ids=eos_ids,
            sliding_window=_sliding_window(hf),
        )


def _sliding_window(hf) -> int | None:
    window = getattr(hf, "sliding_window", None)
    if window is None or getattr(hf, "use_sliding_window", True) is False:
        return None
    return int(window)


@dataclass(frozen=True)
class LoRAConfig:
    max_loras_per_batch: int = 8  # device slots = distinct adapters in one batch
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None  # host LRU cache size; None = unbounded
    backend: str = "auto"  # "torch" | "triton" | "auto"
    # host LRU cache bound in bytes (serving dtype); None = min(1/8 of RAM, 32 GiB)
    max_cpu_lora_bytes: int | None = None

    def __post_init__(self) -> None:
        if self.max_loras_per_batch < 1:
            raise ValueError(f"max_loras_per_batch={self.max_loras_per_batch} must be >= 1")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank={self.max_lora_rank} must be >= 1")
        if self.max_cpu_loras is not None and self.max_cpu_loras < 1:
            raise ValueError(f"max_cpu_loras={self.max_cpu_loras} must be >= 1 or None")
        cap = self.max_cpu_lora_bytes
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"max_cpu_lora_bytes={self.max_cpu_lora_bytes!r} must be an int >= 1 "
                             f"or None")
        if self.backend not in ("torch", "triton", "auto"):
            raise ValueError(f"lora_backend={self.backend!r} must be 'torch', 'triton' or 'auto'")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from memory
    kv_cache_memory_bytes: int = 1 << 30  # budget when num_blocks is None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"device={device!r} must be 'cpu', 'cuda' or 'auto'")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """``auto`` = float32 on CPU, the checkpoint's dtype (bf16/fp16) on CUDA."""
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return (
            checkpoint_dtype
            if checkpoint_dtype in (torch.bfloat16, torch.float16)
            else torch.bfloat16
        )
    if dtype not in table:
        raise ValueError(f"dtype={dtype!r} must be one of auto, {', '.join(table)}")
    return table[dtype]


def apply_cpu_threads() -> None:
    """``LORAPLEX_NUM_THREADS`` caps torch's CPU threads (servers sharing a machine)."""
    n = int(os.environ.get("LORAPLEX_NUM_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)
