"""Qwen2: the Llama decoder with biases on q/k/v (``attention_bias``) and, usually, tied
embeddings. ModelConfig.from_hf sets ``attention_bias`` for Qwen2 architectures."""

from loraplex.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
