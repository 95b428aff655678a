"""Batched ops. LoRA: ``lora_meta`` (the per-forward ``LoRABatch``), ``lora_ref`` (plain reference
shrink/expand), ``lora_torch`` (the torch backend), ``lora_cpu`` (the CPU backend, in C:
``lora_cpu.c``, built by ``native_build``), ``lora_triton`` (GPU kernels, same signatures;
kernels in ``lora_triton_kernels``), ``lora_ops`` (backend choice), ``lora_triton_aot``
(compile the kernels for a GPU target without one), ``lora_testing`` (random cases and a
float64 oracle). Paged decode attention: ``paged_attention`` (the op and backend choice) over
``paged_attention_ref`` / ``_torch`` / ``_triton``. Elementwise: ``elementwise`` (where the
fused kernels run), ``elementwise_triton`` (RMSNorm with the residual add, rotary, SiLU*up),
``elementwise_aot``. ``sampling_triton``: the fused GPU sampler. ``triton_aot``: the shared
sm_90 compile check."""

from loraplex.ops.lora_meta import LoRABatch
from loraplex.ops.lora_ops import LoRAOps, get_lora_ops, resolve_lora_backend

__all__ = ["LoRABatch", "LoRAOps", "get_lora_ops", "resolve_lora_backend"]
