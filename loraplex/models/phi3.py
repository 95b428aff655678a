"""Phi-3: the Llama decoder, with q/k/v and gate/up already fused in the checkpoint
(``qkv_proj``, ``gate_up_proj``: q|k|v and gate|up rows, our fused layout) and, on the 4k
models, a sliding window over every layer."""

from loraplex.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    # checkpoint tensors that are already our fused params (the loader splits them into
    # their shards, so missing-tensor checks still name each shard)
    fused_in_checkpoint = ("qkv_proj", "gate_up_proj")
