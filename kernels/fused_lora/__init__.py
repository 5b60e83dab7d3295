"""Fused LoRA linear ``x Wᵀ + b + s·(x Aᵀ) Bᵀ``: dispatches per call to Triton or the reference."""

from __future__ import annotations

import torch

from tunekit.kernels._dispatch import backend
from tunekit.kernels._utils import check_dot_dtype
from tunekit.kernels.fused_lora.reference import lora_linear_ref


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """LoRA linear; x: (..., in), weight: (out, in), lora_a: (r, in), lora_b: (out, r) -> (..., out).

    Triton for CUDA tensors (or a forced ``interpret``), the PyTorch reference otherwise.

    Raises:
        ValueError: bf16 under the interpreter, or mismatched dtypes on the Triton path.
    """
    which = backend(x, weight, lora_a, lora_b)
    if which == "reference":
        return lora_linear_ref(x, weight, bias, lora_a, lora_b, scaling)
    check_dot_dtype(which, x, op="lora_linear")
    dtypes = {t.dtype for t in (x, weight, bias, lora_a, lora_b) if t is not None}
    if len(dtypes) != 1:
        raise ValueError(f"lora_linear kernel needs one dtype for x, weight, bias and LoRA, got {sorted(map(str, dtypes))}")
    from tunekit.kernels.fused_lora.triton_impl import LoRALinearFunction

    return LoRALinearFunction.apply(x, weight, bias, lora_a, lora_b, float(scaling), which == "interpret")


__all__ = ["lora_linear", "lora_linear_ref"]
