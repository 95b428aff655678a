"""Frozen, validated configuration: the model's shape, and the engine's limits."""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from loraplex.errors import ConfigError, ConfigTypeError, DeviceError, ModelLoadError


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    # "llama3" (Llama 3.1 frequency bands) or "linear" (positions / factor, Gemma 3);
    # None means plain RoPE.
    scaling_type: str | None = None
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


# Architectures whose checkpoints hold q/k/v and gate/up as one tensor each.
FUSED_PROJ_ARCHITECTURES = frozenset({"Phi3ForCausalLM"})


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
    sliding_window: int | None = None  # Mistral/Qwen2/Gemma windowed attention, when enabled
    # per layer "sliding_attention" | "full_attention" (Gemma, Qwen); None: every layer
    # windowed when ``sliding_window`` is set (Mistral, Phi-3)
    layer_types: tuple[str, ...] | None = None
    hidden_act: str = "silu"  # the MLP's gate activation: "silu" | "gelu_pytorch_tanh"
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by its -1/2, not d's
    attn_logit_softcap: float | None = None  # Gemma 2: softcap * tanh(scores / softcap)
    final_logit_softcap: float | None = None  # Gemma 2/3: the same on the logits
    local_rope: RopeConfig | None = None  # Gemma 3: the sliding layers' own RoPE base

    def layer_window(self, layer_idx: int) -> int | None:
        """The sliding window of layer ``layer_idx`` (None: it attends to the whole context)."""
        if self.layer_types is not None and self.layer_types[layer_idx] != "sliding_attention":
            return None
        return self.sliding_window

    def layer_rope(self, layer_idx: int) -> RopeConfig:
        if self.local_rope is not None and self.layer_window(layer_idx) is not None:
            return self.local_rope
        return self.rope

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

    def checkpoint_projs(self) -> dict[str, tuple[str, ...]]:
        """The projections as the checkpoint (and PEFT adapters for it) name them -> the
        projections of ``proj_shapes`` each one stacks, in row order. Phi-3 stores q|k|v
        and gate|up fused."""
        if self.architecture in FUSED_PROJ_ARCHITECTURES:
            return {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                    "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
        return {p: (p,) for p in self.proj_shapes()}

    @classmethod
    def from_hf(cls, hf) -> ModelConfig:
        """Build from a ``transformers.PretrainedConfig`` (v4 or v5 rope fields)."""
        arch = (getattr(hf, "architectures", None) or [type(hf).__name__])[0]
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        rope_params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None)
        rope_params = dict(rope_params or {})
        default_theta = getattr(hf, "rope_theta", 10000.0)
        local_rope = None
        if "full_attention" in rope_params:  # Gemma 3 (transformers 5): one entry per layer type
            if "sliding_attention" in rope_params:
                local_rope = _rope_config(rope_params["sliding_attention"], default_theta)
            rope_params = dict(rope_params["full_attention"])
        elif getattr(hf, "rope_local_base_freq", None) is not None:  # Gemma 3, transformers 4
            local_rope = RopeConfig(theta=float(hf.rope_local_base_freq))
        rope = _rope_config(rope_params, default_theta)
        if float(rope_params.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ModelLoadError(f"partial_rotary_factor={rope_params['partial_rotary_factor']}"
                                 " is not supported (only 1.0)")
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
            layer_types=tuple(hf.layer_types) if getattr(hf, "layer_types", None) else None,
            hidden_act=getattr(hf, "hidden_activation", None) or getattr(hf, "hidden_act", "silu"),
            query_pre_attn_scalar=_optional_float(hf, "query_pre_attn_scalar"),
            attn_logit_softcap=_optional_float(hf, "attn_logit_softcapping"),
            final_logit_softcap=_optional_float(hf, "final_logit_softcapping"),
            local_rope=local_rope,
        )


def _optional_float(hf, name: str) -> float | None:
    value = getattr(hf, name, None)
    return None if value is None else float(value)


def _rope_config(params: Mapping, default_theta: float) -> RopeConfig:
    theta = float(params.get("rope_theta", default_theta))
    rtype = params.get("rope_type", params.get("type", "default"))
    if rtype in ("default", None):
        return RopeConfig(theta=theta)
    if rtype == "linear":
        return RopeConfig(theta=theta, scaling_type="linear", factor=float(params["factor"]))
    if rtype == "llama3":
        return RopeConfig(
            theta=theta,
            scaling_type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            original_max_position=int(params.get("original_max_position_embeddings", 8192)),
        )
    raise ModelLoadError(f"rope type {rtype!r} is not supported (supported: default, linear, "
                         "llama3)")


def _sliding_window(hf) -> int | None:
    window = getattr(hf, "sliding_window", None)
    if window is None or getattr(hf, "use_sliding_window", True) is False:
        return None
    return int(window)


def check_int(name: str, value, minimum: int = 1, optional: bool = False) -> None:
    """An engine limit: an int (not a bool) >= ``minimum``; ``None`` too when ``optional``.
    Every limit goes through here, so ``0`` never means "use the default"."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # numpy ints pass
        raise ConfigTypeError(f"{name}={value!r} must be an integer"
                              + (" or None" if optional else ""))
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")


def check_bool(name: str, value) -> None:
    """A switch: True or False only (a truthy string such as "false" is refused)."""
    if not isinstance(value, bool):
        raise ConfigTypeError(f"{name}={value!r} must be True or False")


def check_fraction(name: str, value) -> None:
    """A float in (0, 1] (an int 1 is accepted; a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigTypeError(f"{name}={value!r} must be a number in (0, 1]")
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise ConfigError(f"{name}={value} must be in (0, 1]")


def check_adapter_map(adapters) -> None:
    """``adapters`` is None or a mapping of adapter name -> PEFT directory (a list of
    directories would leave the adapters nameless)."""
    if adapters is None:
        return
    if not isinstance(adapters, Mapping):
        raise ConfigTypeError(f"adapters must be a dict of name -> PEFT adapter directory, "
                              f"got a {type(adapters).__name__}")
    for name, path in adapters.items():
        if not isinstance(name, str) or not name:
            raise ConfigTypeError(f"adapters: name {name!r} must be a non-empty string")
        if not isinstance(path, (str, os.PathLike)):
            raise ConfigTypeError(f"adapters[{name!r}]={path!r} must be a directory path")


@dataclass(frozen=True)
class LoRAConfig:
    max_loras_per_batch: int = 8  # device slots = distinct adapters in one batch
    max_lora_rank: int = 64
    max_cpu_loras: int | None = None  # host LRU cache size; None = unbounded
    backend: str = "auto"  # "torch" | "cpu" | "triton" | "auto" (ops/lora_ops.py)
    # host LRU cache bound in bytes (serving dtype); None = min(1/8 of RAM, 32 GiB)
    max_cpu_lora_bytes: int | None = None
    # device slots for adapters with a full embedding / lm_head copy (PEFT modules_to_save),
    # each 2 x vocab x hidden x dtype bytes (lora/full_module_layers.py): 2.1 GB for
    # Llama-3-8B in bf16, so none is reserved unless asked (as vLLM reserves nothing for a
    # feature not enabled); 0 refuses such adapters at load, naming this flag
    max_full_module_adapters: int = 0
    # serve adapters that target lm_head: allocates B [max_loras_per_batch, vocab,
    # max_lora_rank] (and A [.., max_lora_rank, hidden]) up front, e.g. 128 MiB for a 128k
    # vocabulary at rank 64, 8 slots, bf16; off, such adapters are refused when loaded
    enable_lm_head_lora: bool = False

    def __post_init__(self) -> None:
        check_int("max_loras_per_batch", self.max_loras_per_batch)
        check_int("max_lora_rank", self.max_lora_rank)
        check_int("max_cpu_loras", self.max_cpu_loras, optional=True)
        check_int("max_cpu_lora_bytes", self.max_cpu_lora_bytes, optional=True)
        check_int("max_full_module_adapters", self.max_full_module_adapters, minimum=0)
        check_bool("enable_lm_head_lora", self.enable_lm_head_lora)
        if self.backend not in ("torch", "cpu", "triton", "auto"):
            raise ConfigError(
                f"lora_backend={self.backend!r} must be 'torch', 'cpu', 'triton' or 'auto'")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    # prefill chunks and decodes share each step's token budget (engine/scheduler.py);
    # False: a step is either a prefill of whole prompts or a decode
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            check_int(name, getattr(self, name))
        check_bool("enable_chunked_prefill", self.enable_chunked_prefill)


# The KV budget on CPU when neither a block count nor a byte budget is given: host memory
# has no "free device memory" to measure, and other processes share it.
DEFAULT_CPU_KV_BYTES = 1 << 30


@dataclass(frozen=True)
class CacheConfig:
    """How big the paged KV cache is, in order of precedence: ``num_blocks`` (exact count),
    ``kv_cache_memory_bytes`` (a byte budget), else sized from memory: on CUDA
    ``gpu_memory_utilization`` of the device minus the profiled peak of the largest step
    (``kvcache/sizing.py``), on CPU ``DEFAULT_CPU_KV_BYTES``."""

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    # full blocks shared by (adapter generation, token prefix); see kvcache/prefix_cache.py
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        check_bool("enable_prefix_caching", self.enable_prefix_caching)
        check_int("block_size", self.block_size)
        check_int("num_kv_blocks", self.num_blocks, optional=True)
        check_int("kv_cache_memory_bytes", self.kv_cache_memory_bytes, optional=True)
        check_fraction("gpu_memory_utilization", self.gpu_memory_utilization)


def resolve_device(device: str) -> torch.device:
    """``auto`` = CUDA when available, else CPU. Raises ``DeviceError`` saying what torch
    found when a CUDA device is asked for and there is none (or not that index)."""
    if not isinstance(device, str):
        raise ConfigTypeError(f"device={device!r} must be a string: 'cpu', 'cuda' or 'auto'")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device={device!r} must be 'cpu', 'cuda' or 'auto'")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:  # "cuda:x"
        raise ConfigError(f"device={device!r} is not a valid device: {exc}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            built = (f"CUDA {torch.version.cuda}" if torch.version.cuda
                     else "CUDA not compiled in")
            raise DeviceError(f"device={device!r} but torch reports no CUDA device "
                              f"(torch {torch.__version__}, {built}); use device='cpu'")
        if dev.index is not None and dev.index >= count:
            raise DeviceError(f"device={device!r} but torch sees only {count} CUDA "
                              f"device(s) (indices 0-{count - 1})")
    return dev


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
        raise ConfigError(f"dtype={dtype!r} must be one of auto, {', '.join(table)}")
    return table[dtype]


def apply_cpu_threads() -> None:
    """``LORAPLEX_NUM_THREADS`` caps torch's CPU threads (servers sharing a machine)."""
    n = int(os.environ.get("LORAPLEX_NUM_THREADS", "0") or 0)
    if n > 0:
        torch.set_num_threads(n)


def check_tensor_parallel(tp: int, cfg: ModelConfig, device: torch.device) -> None:
    """``tensor_parallel_size``: an int >= 1 that splits the model evenly (attention heads,
    KV heads or their replication, the MLP's intermediate features: the sharding rules of
    ``distributed/sharding.py``). On CUDA, one GPU a rank: ranks use ``cuda:0`` ..
    ``cuda:N-1``."""
    from loraplex.distributed.sharding import divide, kv_heads_per_rank  # (imports config)

    check_int("tensor_parallel_size", tp)
    if tp == 1:
        return
    kv_heads_per_rank(cfg.num_kv_heads, cfg.num_heads, tp)
    divide(cfg.intermediate_size, tp, "intermediate_size")
    if device.type == "cuda":
        if device.index not in (None, 0):
            raise ConfigError(f"device={str(device)!r} with tensor_parallel_size={tp}: ranks "
                              f"use cuda:0 .. cuda:{tp - 1}; pass device='cuda'")
        count = torch.cuda.device_count()
        if tp > count:
            raise ConfigError(f"tensor_parallel_size={tp} needs {tp} GPUs (one a rank); "
                              f"torch sees {count}")
