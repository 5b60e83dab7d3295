"""tunekit.kernels: math on tensors, each op with a pure-PyTorch reference.

Knows no model; imports torch (and triton, lazily, when a Triton backend is used).
"""

from tunekit.kernels.fused_lora.reference import lora_linear_ref


def lora_linear(x, weight, bias, lora_a, lora_b, scaling):
    """LoRA linear ``x Wᵀ + b + s·(x Aᵀ) Bᵀ``; dispatches to the fused kernel where one applies."""
    return lora_linear_ref(x, weight, bias, lora_a, lora_b, scaling)


__all__ = ["lora_linear", "lora_linear_ref"]
