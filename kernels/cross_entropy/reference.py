"""Reference (PyTorch) cross-entropy rows and the chunked fused linear + cross-entropy.

The chunked reference is also the CPU runtime path: it never builds the full
(N, V) logits, so it saves memory on a CPU too (see ``chunked.py`` for the math).
"""

from __future__ import annotations

import torch

from tunekit.kernels.cross_entropy.chunked import (
    CEOptions,
    LinearCrossEntropyFunction,
    default_chunk_size,
)


def ce_rows_ref(logits, labels, opts: CEOptions, grad_scale, upcast: bool = True):
    """Per-row loss and (scaled) logit gradient for one chunk.

    Args:
        logits: (C, V), consumed (may be overwritten).
        labels: (C,) int64.
        opts: loss options.
        grad_scale: multiply the gradient by this (1/n_valid); ``None`` = no gradient.
        upcast: softmax in fp32 (as transformers' loss does); ``False`` stays in the logits dtype.

    Returns:
        (loss_rows (C,) fp32 with 0 on ignored rows, dlogits (C, V) in the logits dtype or None).
    """
    x = logits.float() if upcast else logits
    vocab = x.shape[-1]
    valid = labels != opts.ignore_index
    target = labels.masked_fill(~valid, 0).unsqueeze(1)
    lse = torch.logsumexp(x, dim=-1)
    eps, z = opts.label_smoothing, opts.z_loss
    loss = (1 - eps) * (lse - x.gather(1, target).squeeze(1))
    if eps:
        loss = loss + eps * (lse - x.mean(-1))
    if z:
        loss = loss + z * lse * lse
    loss = loss.float().masked_fill(~valid, 0.0)
    if grad_scale is None:
        return loss, None
    g = x.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place on our own buffer
    if z:
        g.mul_((1 + 2 * z * lse).unsqueeze(1))
    if eps:
        g.sub_(eps / vocab)
    g.scatter_add_(1, target, torch.full_like(target, -(1 - eps), dtype=g.dtype))
    g.mul_((valid * grad_scale).to(g.dtype).unsqueeze(1))
    return loss, g.to(logits.dtype)


def fused_linear_cross_entropy_ref(
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
    upcast: bool = True,
) -> torch.Tensor:
    """Cross-entropy of ``h Wᵀ + b + s·(h Aᵀ)Bᵀ`` against labels, in row chunks (PyTorch).

    Args:
        hidden: (N, H) (or (..., H), flattened).
        weight: (V, H) output head.
        labels: (N,) int64 with ``ignore_index`` for masked rows.
        bias: (V,) or None.
        lora_a, lora_b: (r, H), (V, r) LoRA on the head, or None.
        lora_scaling: LoRA scale s.
        ignore_index, label_smoothing, z_loss, reduction: as ``nn.CrossEntropyLoss`` plus the PaLM z-loss.
        chunk_size: rows per chunk (default: chunk logits about the size of ``hidden``).
        upcast: softmax in fp32.

    Returns:
        scalar fp32 loss.
    """
    def rows_fn(logits, lab, opts, grad_scale):
        return ce_rows_ref(logits, lab, opts, grad_scale, upcast)

    return apply_linear_cross_entropy(
        rows_fn, hidden, weight, labels, bias, lora_a, lora_b, lora_scaling,
        CEOptions(ignore_index, label_smoothing, z_loss, reduction), chunk_size,
    )


def apply_linear_cross_entropy(rows_fn, hidden, weight, labels, bias, lora_a, lora_b, lora_scaling, opts, chunk_size):
    """Validate, flatten and run :class:`LinearCrossEntropyFunction` with ``rows_fn``."""
    if opts.reduction not in ("mean", "sum"):
        raise ValueError(f"unknown reduction {opts.reduction!r}; choose 'mean' or 'sum'")
    if (lora_a is None) != (lora_b is None):
        raise ValueError("pass both lora_a and lora_b, or neither")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    if labels.shape[0] != hidden.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} rows but hidden has {hidden.shape[0]}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match head weight {tuple(weight.shape)}")
    chunk = chunk_size or default_chunk_size(hidden.shape[0], hidden.shape[1], weight.shape[0])
    device_type = hidden.device.type
    if not torch.is_autocast_enabled(device_type):
        return LinearCrossEntropyFunction.apply(
            hidden, weight, bias, lora_a, lora_b, labels, float(lora_scaling), opts, rows_fn, chunk,
            torch.is_grad_enabled(),
        )
    # Under autocast, do what it does for the unfused ``F.linear``s: run the matmuls in the autocast
    # dtype (the casts sit outside the Function, so autograd hands fp32 leaves fp32 gradients), and
    # keep autocast out of the Function, whose in-place ops (``addmm_``) it cannot reach.
    dtype = torch.get_autocast_dtype(device_type)
    cast = [t.to(dtype) if t is not None else None for t in (hidden, weight, bias, lora_a, lora_b)]
    with torch.autocast(device_type, enabled=False):
        return LinearCrossEntropyFunction.apply(
            *cast, labels, float(lora_scaling), opts, rows_fn, chunk, torch.is_grad_enabled(),
        )
