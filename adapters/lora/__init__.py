"""The LoRA family: LoRA, rsLoRA scaling, DoRA, and QLoRA (LoRA on a bitsandbytes 4-bit base)."""

from tunekit.adapters.lora.config import LoRAConfig
from tunekit.adapters.lora.layer import LoRABranch, LoRALayer
from tunekit.adapters.lora.method import LoRAMethod
from tunekit.adapters.lora.variants import DoRAVariant, LoRAVariant
from tunekit.adapters.registry import register_method

register_method(LoRAMethod())

__all__ = ["DoRAVariant", "LoRABranch", "LoRAConfig", "LoRALayer", "LoRAMethod", "LoRAVariant"]
