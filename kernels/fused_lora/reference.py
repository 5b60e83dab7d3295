"""Reference LoRA linear: ``y = x Wᵀ + b + s · (x Aᵀ) Bᵀ`` in plain PyTorch.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models" (2021).
The CPU runtime path and the oracle for ``triton_impl.py``.
"""

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
    upcast: bool = False,
) -> torch.Tensor:
    """x: (..., in), weight: (out, in), bias: (out,) | None, lora_a: (r, in), lora_b: (out, r) -> (..., out).

    ``upcast`` computes in fp32 and rounds once to ``x.dtype``.
    """
    if upcast:
        to32 = [t.float() if t is not None else None for t in (x, weight, bias, lora_a, lora_b)]
        return lora_linear_ref(*to32, scaling).to(x.dtype)
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_a), lora_b) * scaling
