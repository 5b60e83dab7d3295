"""RMSNorm (Llama and Gemma variants): public op dispatching per call to Triton or the reference."""

from __future__ import annotations

import torch

from tunekit.kernels._dispatch import backend
from tunekit.kernels.rmsnorm.reference import Casting, rmsnorm_ref


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, offset: float = 0.0, casting: Casting = "llama"
) -> torch.Tensor:
    """RMSNorm over the last dim; same semantics as ``rmsnorm_ref`` (fp32 statistics).

    Args:
        x: (..., H).
        weight: (H,).
        eps: added to the mean square.
        offset: added to the weight (1.0 for Gemma's ``(1 + w)``).
        casting: ``"llama"`` or ``"gemma"`` rounding order.

    Returns:
        (..., H).
    """
    if casting not in ("llama", "gemma"):
        raise ValueError(f"unknown RMSNorm casting {casting!r}; choose 'llama' or 'gemma'")
    which = backend(x, weight)
    if which == "reference":
        return rmsnorm_ref(x, weight, eps, offset, casting)
    from tunekit.kernels.rmsnorm.triton_impl import RMSNormFunction

    return RMSNormFunction.apply(x, weight, float(eps), float(offset), casting, which == "interpret")


__all__ = ["rmsnorm", "rmsnorm_ref"]
