"""A LoRA adapter in normalized host form: per layer and projection, A, B and a scaling.

Whatever the source format (PEFT today), an adapter reaches the pool as a ``LoRAAdapter``
whose tensors are CPU, contiguous and already checked against the base model. The host cache
keeps them in the serving dtype (``to``), so a slot load is a plain copy and the cache holds
no float32 copies of half-precision weights.

The update a module applies is ``y += scaling * (x @ a.T) @ b.T`` with ``x: [tokens, in]``;
a DoRA module first maps its base output ``y = y * col_scale + col_shift`` (its ``b`` already
carries ``col_scale``, see ``lora/dora.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.lora.full_modules import ReplacedModules

# The seven projections of a Llama-family decoder layer that LoRA may target, in the order
# the pool stacks them (q/k/v fuse into QKV, gate/up into gate_up).
PROJ_NAMES: tuple[str, ...] = (
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
)
ATTN_PROJS: frozenset[str] = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
# The input embedding, keyed ``(EMBED_LAYER, EMBED)`` in ``LoRAAdapter.weights``: its LoRA is
# the linear kind on a one-hot input, ``a [r, vocab]`` (PEFT's lora_embedding_A), ``b
# [hidden, r]`` (lora_embedding_B), so ``x @ a.T`` is a gather of a's columns.
EMBED, EMBED_LAYER = "embed_tokens", -1
# The output projection, keyed ``(EMBED_LAYER, LM_HEAD)``: the linear kind, ``a [r, hidden]``,
# ``b [vocab, r]``, on the final hidden states (served only with ``enable_lm_head_lora``).
LM_HEAD = "lm_head"


def hf_module_name(layer: int, proj: str) -> str:
    """The module's name in a Hugging Face ``*ForCausalLM``, e.g. ``model.layers.3.mlp.up_proj``."""
    if proj == EMBED:
        return "model.embed_tokens"
    if proj == LM_HEAD:
        return LM_HEAD
    block = "self_attn" if proj in ATTN_PROJS else "mlp"
    return f"model.layers.{layer}.{block}.{proj}"


@dataclass
class LoRAWeights:
    """One module's low-rank update: ``delta_W = scaling * b @ a``, shape ``[out, in]``."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA
    # DoRA only (None for plain LoRA), float32 [out]: magnitude / ||W + scaling * B @ A|| per
    # output row of W, and (1 - col_scale) * bias (None when the base layer has no bias).
    # ``b`` above is then B with row j multiplied by col_scale[j].
    col_scale: torch.Tensor | None = None
    col_shift: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def nbytes(self) -> int:
        extra = sum(t.nbytes for t in (self.col_scale, self.col_shift) if t is not None)
        return self.a.nbytes + self.b.nbytes + extra


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
    # modules_to_save / trainable tokens of the embedding and lm_head (None: none)
    replaced: ReplacedModules | None = None

    @property
    def needs_full_slot(self) -> bool:
        """Whether it holds a full ``[vocab, hidden]`` copy (a full-module slot on device)."""
        return self.replaced is not None and self.replaced.needs_full_slot

    @property
    def uses_dora(self) -> bool:
        return any(w.col_scale is not None for w in self.weights.values())

    @property
    def max_rank(self) -> int:
        return max((w.rank for w in self.weights.values()), default=0)

    @property
    def nbytes(self) -> int:
        """Host bytes held by all its tensors (the cost of keeping it in the CPU cache)."""
        extra = 0 if self.replaced is None else self.replaced.nbytes
        return sum(w.nbytes for w in self.weights.values()) + extra

    def target_modules(self) -> set[str]:
        """The projection names this adapter touches in at least one layer."""
        return {proj for _, proj in self.weights}

    def to(self, dtype: torch.dtype) -> LoRAAdapter:
        """The same adapter with A and B in ``dtype`` (self when they already are)."""
        rep = self.replaced
        if all(w.a.dtype == dtype and w.b.dtype == dtype for w in self.weights.values()) and (
                rep is None or rep.dtype_is(dtype)):
            return self
        # DoRA's column scales stay float32: they multiply the base output, not a GEMM operand
        weights = {k: LoRAWeights(w.a.to(dtype).contiguous(), w.b.to(dtype).contiguous(),
                                  w.scaling, w.col_scale, w.col_shift)
                   for k, w in self.weights.items()}
        return LoRAAdapter(self.name, self.path, weights,
                           None if rep is None else rep.to(dtype))
