"""LoRA adapters: loading (PEFT), normalized host form, device pool and batch wrappers."""

from loraplex.lora.adapter import PROJ_NAMES, LoRAAdapter, LoRAWeights
from loraplex.lora.peft_loader import load_peft_adapter

__all__ = ["PROJ_NAMES", "LoRAAdapter", "LoRAWeights", "load_peft_adapter"]
