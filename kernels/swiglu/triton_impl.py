"""Triton SwiGLU / GeGLU ``y = act(g) · u``, forward and backward (imported only for triton/interpret).

Math:
    dg = dy · u · act'(g),   du = dy · act(g)
    silu'(g)      = s · (1 + g · (1 − s)),  s = sigmoid(g)
    gelu_tanh'(g) = 0.5·(1 + t) + 0.5·g·(1 − t²)·√(2/π)·(1 + 3·0.044715·g²),
                    t = tanh(√(2/π)·(g + 0.044715·g³))

Source: after Liger-Kernel ``ops/swiglu.py`` and ``ops/geglu.py``
(https://github.com/linkedin/Liger-Kernel/blob/v0.5.10/src/liger_kernel/ops/, BSD-2-Clause):
flat element-wise kernels; the activation output is recomputed in backward
instead of being stored. Unlike Liger, gradients go to fresh buffers, not into
g and u in place, because the projections' outputs may be saved elsewhere.

Dtypes: fp32, fp16, bf16; math in fp32, one rounding per output. tanh is
written with exp (``2·sigmoid(2x) − 1``) so the same code runs in the interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ACTS = {"silu": 0, "gelu_tanh": 1}  # the ACT constexpr of the kernels
_BLOCK = 1024


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g)) in fp32."""
    if ACT == 0:
        s = tl.sigmoid(g)
        return g * s, s * (1.0 + g * (1.0 - s))
    c = 0.7978845608028654  # sqrt(2/pi)
    inner = c * (g + 0.044715 * g * g * g)
    t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
    da = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * g * g)
    return 0.5 * g * (1.0 + t), da


@triton.jit
def _swiglu_fwd_kernel(Y_ptr, G_ptr, U_ptr, n_elements, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act_and_grad(g, ACT)
    tl.store(Y_ptr + offs, (a * u).to(Y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(DG_ptr, DU_ptr, DY_ptr, G_ptr, U_ptr, n_elements, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    dy = tl.load(DY_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a, da = _act_and_grad(g, ACT)
    tl.store(DG_ptr + offs, (dy * u * da).to(DG_ptr.dtype.element_ty), mask=mask)
    tl.store(DU_ptr + offs, (dy * a).to(DU_ptr.dtype.element_ty), mask=mask)


class SwiGLUFunction(torch.autograd.Function):
    """Fused ``act(gate) * up``. ``apply(gate, up, act)`` with act ``"silu"`` | ``"gelu_tanh"``.

    Saves gate and up (no activation output is stored; backward recomputes it).
    """

    @staticmethod
    def forward(ctx, gate, up, act):
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(f"gate and up must match: {tuple(gate.shape)}/{gate.dtype} vs {tuple(up.shape)}/{up.dtype}")
        gate, up = gate.contiguous(), up.contiguous()
        y = torch.empty_like(gate)
        n = gate.numel()
        _swiglu_fwd_kernel[(triton.cdiv(n, _BLOCK),)](y, gate, up, n, ACT=_ACTS[act], BLOCK=_BLOCK)
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return y

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        _swiglu_bwd_kernel[(triton.cdiv(n, _BLOCK),)](dg, du, dy, gate, up, n, ACT=_ACTS[ctx.act], BLOCK=_BLOCK)
        return dg, du, None
