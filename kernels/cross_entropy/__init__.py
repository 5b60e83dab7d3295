"""Fused linear + cross-entropy (chunked over rows, optional LoRA on the head).

Public op dispatching per call: the Triton row kernels for CUDA tensors (or a
forced ``interpret``), the PyTorch chunk math otherwise. Both share the chunk
loop in ``chunked.py``, so neither materialises the full (N, V) logits.
"""

from __future__ import annotations

import functools

import torch

from tunekit.kernels._dispatch import backend
from tunekit.kernels.cross_entropy.chunked import CEOptions, default_chunk_size
from tunekit.kernels.cross_entropy.dense import cross_entropy_mean
from tunekit.kernels.cross_entropy.reference import (
    apply_linear_cross_entropy,
    ce_rows_ref,
    fused_linear_cross_entropy_ref,
)


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    lora_scaling: float = 1.0,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T (+ bias) (+ s·(hidden @ A.T) @ B.T)`` without full logits.

    Args:
        hidden: (N, H) or (..., H) final hidden states.
        weight: (V, H) output head (its gradient is computed only if it requires grad).
        labels: (N,) or (...) int64, ``ignore_index`` for masked positions (already shifted).
        bias: (V,) or None.
        lora_a, lora_b: (r, H) and (V, r) LoRA on the head, or None; ``lora_scaling`` is s.
        ignore_index, label_smoothing, z_loss, reduction: loss options (``"mean"`` over
            non-ignored rows, or ``"sum"``).
        chunk_size: rows per chunk; default makes a chunk's logits about the size of ``hidden``.
        block: vocab block of the Triton row kernels (tests shrink it to cross block boundaries).

    Returns:
        scalar fp32 loss.
    """
    which = backend(hidden, weight)
    if which == "reference":
        rows_fn = ce_rows_ref
    else:
        from tunekit.kernels.cross_entropy.triton_impl import ce_rows_triton

        rows_fn = functools.partial(ce_rows_triton, block=block)
    opts = CEOptions(ignore_index, label_smoothing, z_loss, reduction)
    return apply_linear_cross_entropy(
        rows_fn, hidden, weight, labels, bias, lora_a, lora_b, lora_scaling, opts, chunk_size
    )


__all__ = ["CEOptions", "cross_entropy_mean", "default_chunk_size", "fused_linear_cross_entropy",
           "fused_linear_cross_entropy_ref"]
