from tunekit.kernels.fused_lora.reference import lora_linear_ref

__all__ = ["lora_linear_ref"]
