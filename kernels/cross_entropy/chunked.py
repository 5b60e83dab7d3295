"""Fused linear + cross-entropy: the chunk loop shared by the reference and the Triton path.

    logits = h Wᵀ + b + s·(h Aᵀ) Bᵀ            h: (N, H), W: (V, H), A: (r, H), B: (V, r)
    loss_i = (1−ε)(lse_i − z_{i,y_i}) + ε(lse_i − mean_j z_ij) + λ·lse_i²
    loss   = Σ_{i: y_i ≠ ignore} loss_i / n_valid        (reduction "mean"; "sum" skips the division)
    ∂loss/∂z_i = (softmax(z_i)·(1 + 2λ·lse_i) − (1−ε)·onehot(y_i) − ε/V) / n_valid

The (N, V) logits are never materialised: rows are processed in chunks of C,
and each chunk's logit gradient is turned into dh, dW, db, dA, dB at once and
dropped (the Liger-Kernel ``fused_linear_cross_entropy`` scheme,
https://github.com/linkedin/Liger-Kernel/blob/v0.5.10/src/liger_kernel/ops/fused_linear_cross_entropy.py,
BSD-2-Clause). Gradients are therefore computed during the forward when any
input needs one; backward only scales them by the incoming scalar gradient.
Peak extra memory is O(C·V + N·H + |trainable head|) instead of O(N·V).

Chunk-level work (softmax, loss, logit gradient) is a ``rows_fn`` supplied by
the backend: PyTorch (``reference.py``) or Triton (``triton_impl.py``).
Matmuls run in the input dtype (under ``torch.autocast``, in its dtype, as ``F.linear`` would);
the weight/bias/LoRA gradients accumulate in fp32.
Limits: no logit soft-capping or logit scaling; the loss is NaN when every
label is ignored (as in PyTorch) while the gradients are then zero.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch


@dataclass(frozen=True)
class CEOptions:
    """Loss options shared by every backend."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    reduction: Literal["mean", "sum"] = "mean"


# rows_fn(logits (C, V), labels (C,), opts, grad_scale | None) -> (loss_rows (C,) fp32, dlogits (C, V) | None)
RowsFn = Callable[[torch.Tensor, torch.Tensor, CEOptions, "float | None"], tuple[torch.Tensor, "torch.Tensor | None"]]


# Fewer, larger chunks amortise per-op launch and thread-sync costs (measured: 16-row chunks
# run 2x slower than full logits on a CPU); 256 rows of a 128k vocab are 128 MiB in fp32.
MIN_CHUNK_ROWS = 256


def default_chunk_size(n_rows: int, hidden: int, vocab: int) -> int:
    """Rows per chunk: logits about the size of the hidden states (Liger's rule), at least ``MIN_CHUNK_ROWS``."""
    rows = max(MIN_CHUNK_ROWS, -(-n_rows * hidden // vocab))
    return max(1, min(n_rows, 1 << (rows - 1).bit_length()))


def _chunk_logits(h, weight, bias, u, lora_b, scaling):
    logits = h @ weight.T
    if bias is not None:
        logits += bias
    if u is not None:
        logits.addmm_(u, lora_b.T, alpha=scaling)
    return logits


def _grad_buffers(hidden, weight, bias, lora_a, lora_b, needs):
    """[dh, dW, db, dA, dB]: dh in the input dtype (written per chunk), the rest fp32 accumulators."""
    acc = torch.float32
    dh = torch.empty_like(hidden) if needs[0] else None
    rest = [torch.zeros(t.shape, dtype=acc, device=t.device) if need else None
            for t, need in zip((weight, bias, lora_a, lora_b), needs[1:])]
    return [dh, *rest]


def _backprop_chunk(g, h, u, rows: slice, weight, lora_a, lora_b, scaling: float, grads) -> None:
    """Add one chunk's contribution; g: (C, V) logit gradient, h: (C, H), u: (C, r) | None."""
    dh, dw, db, da, dbb = grads
    acc = torch.float32
    if dh is not None:
        dh[rows] = g @ weight
    if dw is not None:
        dw.addmm_(g.T.to(acc), h.to(acc))
    if db is not None:
        db += g.sum(0, dtype=acc)
    if lora_a is None:
        return
    gb = g @ lora_b  # (C, r)
    if dh is not None:
        dh[rows].addmm_(gb, lora_a, alpha=scaling)
    if da is not None:
        da.addmm_(gb.T.to(acc), h.to(acc), alpha=scaling)
    if dbb is not None:
        dbb.addmm_(g.T.to(acc), u.to(acc), alpha=scaling)


def linear_cross_entropy_chunks(
    hidden, weight, bias, lora_a, lora_b, scaling: float, labels, opts: CEOptions,
    rows_fn: RowsFn, chunk_size: int, needs: tuple[bool, bool, bool, bool, bool],
):
    """Loss and (pre-scaled) gradients. Tensors as in the module docstring; labels: (N,).

    Returns:
        (loss scalar fp32, [dh, dW, db, dA, dB] each a tensor or None per ``needs``).
    """
    n_valid = int((labels != opts.ignore_index).sum())
    denom = n_valid if opts.reduction == "mean" else 1
    want_grad = any(needs)
    grad_scale = (1.0 / denom if denom else 0.0) if want_grad else None
    u = hidden @ lora_a.T if lora_a is not None else None  # (N, r): small, kept whole
    grads = _grad_buffers(hidden, weight, bias, lora_a, lora_b, needs)
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        h, uc = hidden[rows], (u[rows] if u is not None else None)
        loss_rows, g = rows_fn(_chunk_logits(h, weight, bias, uc, lora_b, scaling), labels[rows], opts, grad_scale)
        total += loss_rows.sum()
        if want_grad:
            _backprop_chunk(g, h, uc, rows, weight, lora_a, lora_b, scaling, grads)
    loss = total / denom if opts.reduction == "mean" else total
    refs = [hidden, weight, bias, lora_a, lora_b]
    return loss, [g.to(r.dtype) if g is not None else None for g, r in zip(grads, refs)]


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked linear + cross-entropy with gradients computed in the forward.

    ``apply(hidden, weight, bias, lora_a, lora_b, labels, scaling, opts, rows_fn, chunk_size, grad_enabled)``.
    Options: ``opts`` (:class:`CEOptions`), ``rows_fn`` (backend per-chunk math),
    ``chunk_size`` (rows per chunk), ``grad_enabled`` (the caller's grad mode:
    ``needs_input_grad`` stays True under ``no_grad``, and evaluation must not pay
    for gradients). Saves only the finished gradients.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, lora_a, lora_b, labels, scaling, opts, rows_fn, chunk_size, grad_enabled):
        needs = tuple(bool(n) and grad_enabled for n in ctx.needs_input_grad[:5])
        loss, grads = linear_cross_entropy_chunks(
            hidden, weight, bias, lora_a, lora_b, scaling, labels, opts, rows_fn, chunk_size, needs
        )
        ctx.save_for_backward(*[g for g in grads if g is not None])
        ctx.present = [g is not None for g in grads]
        return loss

    @staticmethod
    def backward(ctx, dloss):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * dloss if present else None for present in ctx.present]
        return (*grads, None, None, None, None, None, None)
