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
    # The scale goes on the rank-r intermediate and the update is accumulated into the base GEMM's
    # output (beta = 1): no elementwise pass over the (N, out) output, forward or backward.
    rows = x.reshape(-1, x.shape[-1])  # (N, in)
    out = F.linear(rows, weight, bias)  # (N, out), a fresh tensor: the in-place add below is safe
    out.addmm_(F.linear(rows, lora_a) * scaling, lora_b.t())
    return out.view(*x.shape[:-1], out.shape[-1])
