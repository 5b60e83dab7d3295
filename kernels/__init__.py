"""tunekit.kernels: math on tensors, each op with a pure-PyTorch reference.

Knows no model; imports torch only (triton lazily, when a Triton backend is
chosen for a call). Every public op picks its backend per call
(``tunekit.kernels._dispatch``): Triton for CUDA tensors, the reference
otherwise, or whatever ``use_backend(...)`` forces.
"""

from tunekit.kernels._dispatch import backend, use_backend
from tunekit.kernels.cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_ref
from tunekit.kernels.flash_attention import flash_attention, flash_attention_ref
from tunekit.kernels.fused_lora import lora_linear, lora_linear_ref
from tunekit.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from tunekit.kernels.rope import rope, rope_ref
from tunekit.kernels.swiglu import geglu, geglu_ref, glu, glu_ref, swiglu, swiglu_ref

__all__ = [
    "backend",
    "flash_attention",
    "flash_attention_ref",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_ref",
    "geglu",
    "geglu_ref",
    "glu",
    "glu_ref",
    "lora_linear",
    "lora_linear_ref",
    "rmsnorm",
    "rmsnorm_ref",
    "rope",
    "rope_ref",
    "swiglu",
    "swiglu_ref",
    "use_backend",
]
