"""A LoRA adapter in normalized host form: per layer and projection, A, B and a scaling.

Whatever the source format (PEFT today), an adapter reaches the pool as a ``LoRAAdapter``
whose tensors are CPU, contiguous and already checked against the base model. The host cache
keeps them in the serving dtype (``to``), so a slot load is a plain copy and the cache holds
no float32 copies of half-precision weights.

The update a module applies is ``y += scaling * (x @ a.T) @ b.T`` with ``x: [tokens, in]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The seven projections of a Llama-family decoder layer that LoRA may target, in the order
# the pool stacks them (q/k/v fuse into QKV, gate/up into gate_up).
PROJ_NAMES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
ATTN_PROJS: frozenset[str] = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})


def hf_module_name(layer: int, proj: str) -> str:
    """The module's name in a Hugging Face ``*ForCausalLM``, e.g. ``model.layers.3.mlp.up_proj``."""
    block = "self_attn" if proj in ATTN_PROJS else "mlp"
    return f"model.layers.{layer}.{block}.{proj}"


@dataclass
class LoRAWeights:
    """One module's low-rank update: ``delta_W = scaling * b @ a``, shape ``[out, in]``."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAAdapter:
    """A loaded adapter: ``weights[(layer, proj)]`` for each targeted module, absent otherwise.

    ``proj`` is a Hugging Face projection name from ``PROJ_NAMES``. Ranks may differ per
    module (PEFT ``rank_pattern``); every rank is at most the ``max_lora_rank`` it was
    loaded for.
    """

    name: str
    path: str
    weights: dict[tuple[int, str], LoRAWeights]

    @property
    def max_rank(self) -> int:
        return max((w.rank for w in self.weights.values()), default=0)

    @property
    def nbytes(self) -> int:
        """Host bytes held by all A and B tensors (the cost of keeping it in the CPU cache)."""
        return sum(w.a.nbytes + w.b.nbytes for w in self.weights.values())

    def target_modules(self) -> set[str]:
        """The projection names this adapter touches in at least one layer."""
        return {proj for _, proj in self.weights}

    def to(self, dtype: torch.dtype) -> LoRAAdapter:
        """The same adapter with A and B in ``dtype`` (self when they already are)."""
        if all(w.a.dtype == dtype and w.b.dtype == dtype for w in self.weights.values()):
            return self
        weights = {k: LoRAWeights(w.a.to(dtype).contiguous(), w.b.to(dtype).contiguous(), w.scaling)
                   for k, w in self.weights.items()}
        return LoRAAdapter(self.name, self.path, weights)
