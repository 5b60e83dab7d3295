"""Triton RMSNorm, forward and backward (imported only for the triton/interpret backends).

Math (per row of H elements, w' = w + offset):
    rstd = 1 / sqrt(mean(x²) + eps),  x̂ = x · rstd,  y = x̂ · w'
    dx   = rstd · (dy·w' − x̂ · mean(dy·w'·x̂)),   dw = Σ_rows dy · x̂

Source: structure after Liger-Kernel ``ops/rms_norm.py``
(https://github.com/linkedin/Liger-Kernel/blob/v0.5.10/src/liger_kernel/ops/rms_norm.py,
BSD-2-Clause, itself after Unsloth, Apache-2.0): one program per row forward
(rstd cached for backward); backward runs a persistent loop of rows per program
and writes one fp32 partial dw per program, summed on the host.

Dtypes: fp32, fp16, bf16 (element-wise only, so bf16 is fine in the interpreter).
Accumulation in fp32. Rounding matches ``rmsnorm_ref(casting=...)``. Limits: H <= 65536.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tunekit.kernels._utils import calculate_settings, num_programs


@triton.jit
def _rmsnorm_fwd_kernel(
    Y_ptr, X_ptr, W_ptr, RSTD_ptr, stride_y_row, stride_x_row, n_cols, eps, offset,
    CAST_X_HAT: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X_ptr + row * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    x_hat = x * rstd
    if CAST_X_HAT:
        # Llama rounds x̂ to the input dtype before the weight multiply; the fp32
        # product of two rounded values is then exact, so rounding y once matches it.
        x_hat = x_hat.to(X_ptr.dtype.element_ty).to(tl.float32)
    y = x_hat * (w + offset)
    tl.store(Y_ptr + row * stride_y_row + cols, y.to(Y_ptr.dtype.element_ty), mask=mask)
    tl.store(RSTD_ptr + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(
    DX_ptr, DW_ptr, DY_ptr, X_ptr, W_ptr, RSTD_ptr,
    stride_dx_row, stride_dy_row, stride_x_row, n_rows, n_cols, rows_per_program, offset,
    CAST_X_HAT: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(W_ptr + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        row64 = tl.cast(row, tl.int64)
        x = tl.load(X_ptr + row64 * stride_x_row + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY_ptr + row64 * stride_dy_row + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD_ptr + row64)
        x_hat = x * rstd
        dxh = dy * w
        dx = rstd * (dxh - x_hat * (tl.sum(dxh * x_hat, axis=0) / n_cols))
        tl.store(DX_ptr + row64 * stride_dx_row + cols, dx.to(DX_ptr.dtype.element_ty), mask=mask)
        if CAST_X_HAT:
            x_hat = x_hat.to(X_ptr.dtype.element_ty).to(tl.float32)
        dw += dy * x_hat
    tl.store(DW_ptr + pid * n_cols + cols, dw, mask=mask)


def rmsnorm_fwd(x2d: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, casting: str):
    """x2d: (N, H) contiguous -> (y (N, H), rstd (N,) fp32)."""
    n_rows, n_cols = x2d.shape
    out_dtype = torch.promote_types(x2d.dtype, weight.dtype) if casting == "llama" else x2d.dtype
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x2d.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2d.device)
    block, warps = calculate_settings(n_cols)
    _rmsnorm_fwd_kernel[(n_rows,)](
        y, x2d, weight, rstd, y.stride(0), x2d.stride(0), n_cols, eps, offset,
        CAST_X_HAT=casting == "llama", BLOCK_SIZE=block, num_warps=warps,
    )
    return y, rstd


def rmsnorm_bwd(dy, x2d, weight, rstd, offset: float, casting: str, interpret: bool):
    """dy, x2d: (N, H) -> (dx (N, H), dw (H,) in weight dtype)."""
    n_rows, n_cols = x2d.shape
    dy = dy.contiguous()
    dx = torch.empty_like(x2d)
    progs = num_programs(x2d.device, n_rows, interpret)
    partial_dw = torch.empty((progs, n_cols), dtype=torch.float32, device=x2d.device)
    block, warps = calculate_settings(n_cols)
    _rmsnorm_bwd_kernel[(progs,)](
        dx, partial_dw, dy, x2d, weight, rstd, dx.stride(0), dy.stride(0), x2d.stride(0),
        n_rows, n_cols, triton.cdiv(n_rows, progs), offset,
        CAST_X_HAT=casting == "llama", BLOCK_SIZE=block, num_warps=warps,
    )
    return dx, partial_dw.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """Fused RMSNorm. ``apply(x, weight, eps, offset, casting, interpret)``.

    Options: ``eps`` (float), ``offset`` (0.0 Llama, 1.0 Gemma), ``casting``
    (``"llama"`` | ``"gemma"``, see ``rmsnorm_ref``), ``interpret`` (smaller
    launch for the CPU interpreter). Saves x, weight and the fp32 rstd per row.
    """

    @staticmethod
    def forward(ctx, x, weight, eps, offset, casting, interpret):
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).contiguous()
        y, rstd = rmsnorm_fwd(x2d, weight, eps, offset, casting)
        ctx.save_for_backward(x2d, weight, rstd)
        ctx.opts = (offset, casting, interpret)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2d, weight, rstd = ctx.saved_tensors
        offset, casting, interpret = ctx.opts
        dx, dw = rmsnorm_bwd(dy.reshape(x2d.shape), x2d, weight, rstd, offset, casting, interpret)
        return dx.view(dy.shape), (dw if ctx.needs_input_grad[1] else None), None, None, None, None
