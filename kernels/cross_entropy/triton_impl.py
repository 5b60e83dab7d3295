"""Triton cross-entropy rows for the fused linear + cross-entropy (imported only for triton/interpret).

Per chunk of logits (C, V) (math in ``chunked.py``):
- ``_cross_entropy_fwd_kernel``: one program per row; an online max / sum-exp
  over V in blocks (Milakov & Gimelshein 2018) gives lse, then the row loss
  with label smoothing and z-loss; lse is stored for the second kernel.
- ``_cross_entropy_bwd_kernel``: one program per row rewrites the logits in
  place with ∂loss/∂z (already divided by n_valid), so the chunk needs no
  second (C, V) buffer.

Source: after Liger-Kernel ``ops/cross_entropy.py``
(https://github.com/linkedin/Liger-Kernel/blob/v0.5.10/src/liger_kernel/ops/cross_entropy.py,
BSD-2-Clause), split into a loss kernel and a gradient kernel.
Dtypes: logits fp32/fp16/bf16 (element-wise, so bf16 works in the interpreter);
all math in fp32. Limits: ignored rows get loss 0 and gradient 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tunekit.kernels._utils import next_power_of_2
from tunekit.kernels.cross_entropy.chunked import CEOptions


@triton.jit
def _cross_entropy_fwd_kernel(
    X_ptr, stride_x_row, Y_ptr, LOSS_ptr, LSE_ptr, n_cols, ignore_index, eps, z_loss,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X_ptr + row * stride_x_row
    y = tl.load(Y_ptr + row)
    m = float("-inf")
    s = 0.0
    sum_x = 0.0
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(x_row + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        sum_x += tl.sum(tl.where(cols < n_cols, x, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(s)
    valid = y != ignore_index
    x_y = tl.load(x_row + tl.where(valid, y, 0)).to(tl.float32)
    loss = (1.0 - eps) * (lse - x_y) + eps * (lse - sum_x / n_cols) + z_loss * lse * lse
    tl.store(LOSS_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(LSE_ptr + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(
    X_ptr, stride_x_row, Y_ptr, LSE_ptr, n_cols, ignore_index, eps, z_loss, grad_scale,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X_ptr + row * stride_x_row
    y = tl.load(Y_ptr + row)
    lse = tl.load(LSE_ptr + row)
    scale = tl.where(y != ignore_index, grad_scale, 0.0)
    p_scale = 1.0 + 2.0 * z_loss * lse
    for off in range(0, n_cols, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        g = tl.exp(x - lse) * p_scale - eps / n_cols - tl.where(cols == y, 1.0 - eps, 0.0)
        tl.store(x_row + cols, (g * scale).to(X_ptr.dtype.element_ty), mask=mask)


def ce_rows_triton(logits: torch.Tensor, labels: torch.Tensor, opts: CEOptions, grad_scale, block: int | None = None):
    """Triton version of ``ce_rows_ref``; overwrites ``logits`` (C, V) with the gradient."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    n_rows, n_cols = logits.shape
    labels = labels.contiguous()
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    block = block or min(next_power_of_2(n_cols), 32768 if logits.is_cuda else 1024)
    args = (opts.ignore_index, float(opts.label_smoothing), float(opts.z_loss))
    _cross_entropy_fwd_kernel[(n_rows,)](logits, logits.stride(0), labels, loss, lse, n_cols, *args, BLOCK=block)
    if grad_scale is None:
        return loss, None
    _cross_entropy_bwd_kernel[(n_rows,)](
        logits, logits.stride(0), labels, lse, n_cols, *args, float(grad_scale), BLOCK=block
    )
    return loss, logits
