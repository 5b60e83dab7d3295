"""Cross-entropy of full logits rows with a one-pass backward (the CPU training loss of a causal LM).

``F.cross_entropy`` runs log-softmax, then NLL; its backward zero-fills an (N, V)
gradient, scatters into it and runs log-softmax's backward over it (three passes
over N x V). Here the forward keeps the log-probabilities, and the backward is
``softmax - one_hot`` scaled by ``grad / N``: one ``exp`` of the kept rows and a
scatter. Same math, ~1.5x faster on a CPU for an (N, 8192) head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(logits, dim=-1)  # (N, V)
        ctx.save_for_backward(log_probs, targets)
        return -log_probs.gather(1, targets[:, None]).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        log_probs, targets = ctx.saved_tensors
        scale = grad / log_probs.shape[0]
        dlogits = torch.exp(log_probs)  # softmax, a fresh buffer: a second backward still finds log_probs intact
        dlogits.scatter_add_(1, targets[:, None], torch.full_like(targets[:, None], -1, dtype=dlogits.dtype))
        return dlogits.mul_(scale), None


def cross_entropy_mean(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (N, V) ``logits`` against (N,) ``targets``, every row a target.

    Equal to ``F.cross_entropy(logits, targets)`` up to rounding, forward and backward; rows
    to ignore must be dropped first. An empty batch, and tensor subclasses (DTensor logits of a
    sharded head, the estimator's fake tensors), take ``F.cross_entropy`` itself.

    Example:
        >>> logits = torch.tensor([[0.0, 0.0]], requires_grad=True)
        >>> round(cross_entropy_mean(logits, torch.tensor([1])).item(), 4)
        0.6931
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy_mean needs (N, V) logits and (N,) targets, got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    if logits.shape[0] == 0 or type(logits) is not torch.Tensor:
        return F.cross_entropy(logits, targets)
    return _CrossEntropyFunction.apply(logits, targets)
