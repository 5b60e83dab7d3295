"""Triton fused LoRA linear ``y = x Wᵀ + b + s·(x Aᵀ) Bᵀ``, forward and backward.

Two launches of one GEMM kernel whose epilogue adds the low-rank term:

    forward   u  = x Aᵀ                         (M, r)   GEMM, no epilogue
              y  = x Wᵀ + b + s · u Bᵀ          (M, out) GEMM + rank-r epilogue
    backward  v  = dy B                         (M, r)
              dx = dy W + s · v A               (M, in)  same kernel, operands transposed by strides
              dA = s · vᵀ x,  dB = s · dyᵀ u,  db = Σ dy,  dW = dyᵀ x (only if W requires grad)

so y is written once (no separate base output plus LoRA output plus add) and
dx likewise. The rank-sized reductions dA/dB/dW are left to torch matmul
(cuBLAS): they reduce over M, which a tiled epilogue cannot do without atomics.

Source: the tiled GEMM follows the Triton matrix-multiplication tutorial
(https://github.com/triton-lang/triton/blob/v3.2.0/python/tutorials/03-matrix-multiplication.py, MIT);
the fused low-rank epilogue is the idea of Unsloth's fast LoRA (Apache-2.0).
Dtypes: fp16/bf16/fp32 on a GPU (fp32 pinned to IEEE dot, not TF32); under
the interpreter fp32/fp16 only (bf16 ``tl.dot`` is wrong there: ValueError).
Accumulation in fp32; u and v are rounded to the input dtype, as in the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tunekit.kernels._utils import next_power_of_2


@triton.jit
def _lora_linear_fwd_kernel(
    X_ptr, W_ptr, BIAS_ptr, U_ptr, B_ptr, Y_ptr, M, N, K, R, scaling,
    stride_x_m, stride_x_k, stride_w_n, stride_w_k, stride_u_m, stride_u_r, stride_b_n, stride_b_r,
    stride_y_m, stride_y_n,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Y (M, N) = X (M, K) @ W(N, K)ᵀ [+ bias (N,)] [+ scaling · U (M, R) @ B (N, R)ᵀ]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        x = tl.load(X_ptr + rm[:, None] * stride_x_m + kk[None, :] * stride_x_k,
                    mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        w = tl.load(W_ptr + rn[None, :] * stride_w_n + kk[:, None] * stride_w_k,
                    mask=(rn[None, :] < N) & (kk[:, None] < K), other=0.0)
        acc = _dot(x, w, acc, IEEE)
    if HAS_LORA:
        rr = tl.arange(0, BLOCK_R)
        u = tl.load(U_ptr + rm[:, None] * stride_u_m + rr[None, :] * stride_u_r,
                    mask=(rm[:, None] < M) & (rr[None, :] < R), other=0.0)
        b = tl.load(B_ptr + rn[None, :] * stride_b_n + rr[:, None] * stride_b_r,
                    mask=(rn[None, :] < N) & (rr[:, None] < R), other=0.0)
        acc += scaling * _dot(u, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), IEEE)
    if HAS_BIAS:
        acc += tl.load(BIAS_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y_ptr + rm[:, None] * stride_y_m + rn[None, :] * stride_y_n, acc.to(Y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # fp32 operands would default to TF32 on a GPU; pin IEEE so fp32 matches the reference.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


def _config(interpret: bool) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): one fixed config; the interpreter cannot autotune."""
    return (32, 32, 32) if interpret else (64, 64, 32)


def lora_gemm(x, w_t, bias, u, b_t, scaling: float, interpret: bool) -> torch.Tensor:
    """Launch the kernel. x: (M, K); w_t: a (N, K) view; u: (M, R) or None; b_t: a (N, R) view."""
    M, K = x.shape
    N = w_t.shape[0]
    R = u.shape[1] if u is not None else 1
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bm, bn, bk = _config(interpret)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    u_, b_ = (u, b_t) if u is not None else (x, w_t)  # dummies, never read when HAS_LORA is False
    _lora_linear_fwd_kernel[grid](
        x, w_t, bias if bias is not None else x, u_, b_, y, M, N, K, R, float(scaling),
        x.stride(0), x.stride(1), w_t.stride(0), w_t.stride(1), u_.stride(0), u_.stride(1),
        b_.stride(0), b_.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, HAS_LORA=u is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_R=max(16, next_power_of_2(R)),
    )
    return y


class LoRALinearFunction(torch.autograd.Function):
    """Fused LoRA linear. ``apply(x, weight, bias, lora_a, lora_b, scaling, interpret)``.

    Shapes: x (..., in), weight (out, in), bias (out,) | None, lora_a (r, in), lora_b (out, r).
    Saves x and u = x Aᵀ. dW is computed only when ``weight`` requires grad.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, interpret):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        u = lora_gemm(x2, lora_a, None, None, None, 0.0, interpret)  # (M, r)
        y = lora_gemm(x2, weight, bias, u, lora_b, scaling, interpret)
        ctx.save_for_backward(x2, weight, lora_a, lora_b, u)
        ctx.scaling, ctx.interpret, ctx.shape = scaling, interpret, shape
        return y.view(*shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, lora_a, lora_b, u = ctx.saved_tensors
        s = ctx.scaling
        dy2 = dy.reshape(-1, dy.shape[-1])
        v = lora_gemm(dy2, lora_b.T, None, None, None, 0.0, ctx.interpret)  # (M, r) = dy B
        dx = lora_gemm(dy2, weight.T, None, v, lora_a.T, s, ctx.interpret) if ctx.needs_input_grad[0] else None
        need = ctx.needs_input_grad
        dw = dy2.T @ x2 if need[1] else None
        db = dy2.sum(0) if need[2] else None
        da = (v.T @ x2) * s if need[3] else None
        dbb = (dy2.T @ u) * s if need[4] else None
        dx = dx.view(ctx.shape) if dx is not None else None
        return dx, dw, db, da, dbb, None, None
