"""Rotary position embedding on q and k: public op dispatching per call to Triton or the reference."""

from __future__ import annotations

import torch

from tunekit.kernels._dispatch import backend
from tunekit.kernels.rope.reference import rope_ref


def rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``, fused.

    Args:
        q: (B, Hq, T, D) (``unsqueeze_dim=1``) or (B, T, Hq, D) (``unsqueeze_dim=2``).
        k: (B, Hk, T, D) or (B, T, Hk, D).
        cos, sin: (B, T, D) or (1, T, D).

    Returns:
        (q_embed, k_embed); the inputs are not modified.
    """
    if unsqueeze_dim not in (1, 2) or q.dim() != 4 or k.dim() != 4:
        raise ValueError("rope expects 4-D q/k with heads at dim 1 (unsqueeze_dim=1) or dim 2 (unsqueeze_dim=2)")
    which = backend(q, k, cos, sin)
    if which == "reference":
        return rope_ref(q, k, cos, sin, unsqueeze_dim)
    from tunekit.kernels.rope.triton_impl import RoPEFunction

    return RoPEFunction.apply(q, k, cos, sin, unsqueeze_dim)


__all__ = ["rope", "rope_ref"]
