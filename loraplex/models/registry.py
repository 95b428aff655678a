"""Hugging Face ``architectures`` name -> model class."""

from __future__ import annotations

from torch import nn

from loraplex.errors import ModelLoadError
from loraplex.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM
from loraplex.models.llama import LlamaForCausalLM
from loraplex.models.phi3 import Phi3ForCausalLM
from loraplex.models.qwen2 import Qwen2ForCausalLM
from loraplex.models.qwen3 import Qwen3ForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
}


def get_model_class(architecture: str) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise ModelLoadError(
            f"architecture {architecture!r} is not supported; supported: "
            f"{', '.join(sorted(MODEL_REGISTRY))}"
        ) from None
