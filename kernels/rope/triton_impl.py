"""Triton RoPE for q and k, rotating in place (imported only for the triton/interpret backends).

Math, with x1/x2 the halves of head_dim and c1,c2,s1,s2 the halves of cos/sin:
    forward:  y1 = x1·c1 − x2·s1,   y2 = x2·c2 + x1·s2
    backward: dx1 = dy1·c1 + dy2·s2, dx2 = dy2·c2 − dy1·s1
so the backward is the forward with (s1, s2) replaced by (−s2, −s1), i.e. the
rotation by −θ when c1 = c2 and s1 = s2 (the HF layout).

Source: after Liger-Kernel ``ops/rope.py``
(https://github.com/linkedin/Liger-Kernel/blob/v0.5.10/src/liger_kernel/ops/rope.py,
BSD-2-Clause): one program per (batch, position) rotates every q and k head
of that token, reading cos/sin once.

In place: the kernel overwrites the buffer it reads. ``RoPEFunction`` gives it a
copy (``clone`` keeps the caller's memory layout), because q/k are usually
views of a projection output that autograd or the caller may still hold.
Dtypes: fp32, fp16, bf16 (element-wise); math in fp32, one rounding.
Limits: head_dim even and <= 65536; last dim contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tunekit.kernels._utils import next_power_of_2


@triton.jit
def _rope_rotate(X_ptr, stride_b, stride_h, stride_t, b, t, n_heads, c1, c2, s1, s2,
                 HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < HALF)
    ptr = X_ptr + b * stride_b + t * stride_t + h * stride_h + d
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1 - x2 * s1
    y2 = x2 * c2 + x1 * s2
    tl.store(ptr, y1.to(X_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, y2.to(X_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_fwd_kernel(
    Q_ptr, K_ptr, COS_ptr, SIN_ptr, seq_len, n_q_heads, n_k_heads,
    stride_q_b, stride_q_h, stride_q_t, stride_k_b, stride_k_h, stride_k_t, stride_c_b, stride_c_t,
    HALF: tl.constexpr, BLOCK_QH: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    t = pid % seq_len
    d = tl.arange(0, BLOCK_D)[None, :]
    dmask = d < HALF
    cptr = COS_ptr + b * stride_c_b + t * stride_c_t + d
    sptr = SIN_ptr + b * stride_c_b + t * stride_c_t + d
    c1 = tl.load(cptr, mask=dmask, other=0.0).to(tl.float32)
    c2 = tl.load(cptr + HALF, mask=dmask, other=0.0).to(tl.float32)
    s1 = tl.load(sptr, mask=dmask, other=0.0).to(tl.float32)
    s2 = tl.load(sptr + HALF, mask=dmask, other=0.0).to(tl.float32)
    if BACKWARD:
        s1, s2 = -s2, -s1
    _rope_rotate(Q_ptr, stride_q_b, stride_q_h, stride_q_t, b, t, n_q_heads, c1, c2, s1, s2,
                 HALF, BLOCK_QH, BLOCK_D)
    _rope_rotate(K_ptr, stride_k_b, stride_k_h, stride_k_t, b, t, n_k_heads, c1, c2, s1, s2,
                 HALF, BLOCK_KH, BLOCK_D)


def rope_inplace(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    """Rotate q (B, Hq, T, D) and k (B, Hk, T, D) in place; cos/sin (B|1, T, D)."""
    B, Hq, T, D = q.shape
    if D % 2 or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"rope kernel needs an even head_dim with contiguous last dim, got head_dim={D}")
    cos = cos.expand(B, T, D)
    sin = sin.expand(B, T, D)
    if cos.stride(-1) != 1 or sin.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    _rope_fwd_kernel[(B * T,)](
        q, k, cos, sin, T, Hq, k.shape[1],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), cos.stride(0), cos.stride(1),
        HALF=D // 2, BLOCK_QH=next_power_of_2(Hq), BLOCK_KH=next_power_of_2(k.shape[1]),
        BLOCK_D=next_power_of_2(D // 2), BACKWARD=backward,
    )


class RoPEFunction(torch.autograd.Function):
    """Fused RoPE on q and k. ``apply(q, k, cos, sin, unsqueeze_dim)``.

    Options: ``unsqueeze_dim`` 1 (q/k are (B, H, T, D)) or 2 ((B, T, H, D)).
    No gradient flows to cos/sin (they are buffers of the rotary module).
    """

    @staticmethod
    def forward(ctx, q, k, cos, sin, unsqueeze_dim):
        ctx.save_for_backward(cos, sin)
        ctx.unsqueeze_dim = unsqueeze_dim
        return _rotate_copies(q, k, cos, sin, unsqueeze_dim, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq, dk = _rotate_copies(dq, dk, cos, sin, ctx.unsqueeze_dim, backward=True)
        return dq, dk, None, None, None


def _rotate_copies(q, k, cos, sin, unsqueeze_dim: int, backward: bool):
    # clone() keeps a dense layout's strides, so (B, T, H, D) projections stay copy-free views.
    q, k = q.clone(), k.clone()
    if unsqueeze_dim == 2:
        rope_inplace(q.transpose(1, 2), k.transpose(1, 2), cos, sin, backward)
    else:
        rope_inplace(q, k, cos, sin, backward)
    return q, k
