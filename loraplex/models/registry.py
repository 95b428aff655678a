"""Hugging Face ``architectures`` name -> model class."""

from __future__ import annotations

from torch import nn

from loraplex.errors import ModelLoadError
from loraplex.models.llama import LlamaForCausalLM
from loraplex.models.qwen2 import Qwen2ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ModelLoadError(
            f"architecture {architecture!r} is not supported; supported: "
            f"{', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
