"""Reference LoRA linear: ``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` in plain PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """x: (..., in), weight: (out, in), lora_a: (r, in), lora_b: (out, r) -> (..., out)."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scaling
