"""Launchers for the FlashAttention Triton kernels and the ``autograd.Function`` joining them.

Layouts (see ``flash_attention``): padded q (B, H, Lq, D) with k, v (B, KV, Lk, D),
or packed q (total_q, H, D) with k, v (total_k, KV, D) and ``cu_seqlens``. Inputs are
made contiguous first (free for contiguous callers; Hugging Face's transposed
(B, H, T, D) views cost one copy), so q, o, dq, do share one set of strides and
k, v, dk, dv another. A packed batch is a padded batch with batch stride 0 whose
programs read their sequence offsets from ``cu_seqlens``.
"""

from __future__ import annotations

import dataclasses

import torch
import triton

from tunekit.kernels.flash_attention._checks import check_inputs, default_scale
from tunekit.kernels.flash_attention.triton_impl import (
    FlashConfig,
    _attn_bwd_dkdv_kernel,
    _attn_bwd_dq_kernel,
    _attn_fwd_kernel,
    default_config,
    unsupported_reason,
)

__all__ = ["FlashAttentionFunction", "flash_attention_bwd", "flash_attention_fwd", "flash_attention_triton"]


@dataclasses.dataclass
class AttentionProblem:
    """Everything the forward and both backward kernels share besides q, k, v.

    ``bias`` is fp32-or-input-dtype additive, expanded to (B, H, Lq, Lk) (stride 0 on
    broadcast dims); ``kpm`` is uint8 (B, Lk); ``cu_q``/``cu_k`` are int32 (N + 1,).
    """

    causal: bool
    sm_scale: float
    max_q: int
    max_k: int
    config: FlashConfig
    bias: torch.Tensor | None = None
    kpm: torch.Tensor | None = None
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None

    @property
    def varlen(self) -> bool:
        return self.cu_q is not None

    def pointers(self, dummy: torch.Tensor) -> list[torch.Tensor]:
        """bias, kpm, cu_q, cu_k; absent ones replaced by ``dummy`` (never read: constexpr flags)."""
        return [dummy if t is None else t for t in (self.bias, self.kpm, self.cu_q, self.cu_k)]

    def strides(self, q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor) -> list[int]:
        """(batch, head, token) strides of q and k, of lse, then the bias and padding-mask strides."""
        if self.varlen:  # (T, H, D) tensors, (H, T) lse: no batch stride
            out = [0, q.stride(1), q.stride(0), 0, k.stride(1), k.stride(0), 0, lse.stride(0), lse.stride(1)]
        else:
            out = [*q.stride()[:3], *k.stride()[:3], *lse.stride()]
        out += list(self.bias.stride()) if self.bias is not None else [0, 0, 0, 0]
        out += list(self.kpm.stride()) if self.kpm is not None else [0, 0]
        return out

    def meta(self, head_dim: int) -> dict:
        """Compile-time constants and launch options."""
        return dict(
            HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            BLOCK_M=self.config.block_m, BLOCK_N=self.config.block_n, CAUSAL=self.causal,
            HAS_BIAS=self.bias is not None, HAS_KPM=self.kpm is not None, IS_VARLEN=self.varlen,
            num_warps=self.config.num_warps, num_stages=self.config.num_stages,
        )

    def batches(self, q: torch.Tensor) -> int:
        return self.cu_q.numel() - 1 if self.varlen else q.shape[0]


def flash_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        prob: AttentionProblem) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward launch on contiguous q, k, v.

    Returns:
        o like q, and fp32 lse: (B, H, Lq) padded or (H, total_q) packed.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    o = torch.empty_like(q)
    lse_shape = (heads, q.shape[0]) if prob.varlen else q.shape[:3]
    lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    if q.numel() == 0:
        return o, lse
    grid = (triton.cdiv(prob.max_q, prob.config.block_m), prob.batches(q) * heads)
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, *prob.pointers(q), *prob.strides(q, k, lse),
        prob.max_q, prob.max_k, heads, heads // kv_heads, prob.sm_scale, **prob.meta(q.shape[-1]),
    )
    return o, lse


def flash_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                        lse: torch.Tensor, prob: AttentionProblem) -> tuple[torch.Tensor, ...]:
    """Backward launches: δ = rowsum(o·do) in torch, then the dK/dV and dQ kernels.

    Returns:
        dq, dk, dv with the shapes of q, k, v.
    """
    do = do.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = (o.float() * do.float()).sum(-1)  # (B, H, Lq) or (total_q, H)
    delta = delta.t().contiguous() if prob.varlen else delta  # same layout as lse
    heads, kv_heads = q.shape[1], k.shape[1]
    common = [*prob.pointers(q), *prob.strides(q, k, lse), prob.max_q, prob.max_k]
    meta = prob.meta(q.shape[-1])
    grid = (triton.cdiv(prob.max_k, prob.config.block_n), prob.batches(q) * kv_heads)
    _attn_bwd_dkdv_kernel[grid](q, k, v, do, lse, delta, dk, dv, *common,
                                kv_heads, heads // kv_heads, prob.sm_scale, **meta)
    grid = (triton.cdiv(prob.max_q, prob.config.block_m), prob.batches(q) * heads)
    _attn_bwd_dq_kernel[grid](q, k, v, do, lse, delta, dq, *common,
                              heads, heads // kv_heads, prob.sm_scale, **meta)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    """Triton attention with a recomputing backward.

    ``apply(q, k, v, prob)`` with contiguous q, k, v and an ``AttentionProblem`` holding the
    options: causal (bottom-right), softmax scale, additive bias (no gradient), key-padding
    mask, packed-batch offsets, tile config. Returns (o, lse); lse is not differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, prob: AttentionProblem):
        o, lse = flash_attention_fwd(q, k, v, prob)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.prob = prob
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, ctx.prob)
        return dq, dk, dv, None


def flash_attention_triton(q, k, v, *, causal, softmax_scale=None, attn_mask=None, key_padding_mask=None,
                           cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
                           return_lse=False, config: FlashConfig | None = None):
    """``flash_attention`` on the Triton kernels (same arguments; ``config`` overrides the tiles).

    Raises:
        ValueError: bad shapes (see ``check_inputs``) or inputs the kernel does not support.
    """
    check_inputs(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k)
    reason = unsupported_reason(q, attn_mask)
    if reason is not None:
        raise ValueError(f"flash_attention Triton kernel: {reason}")
    prob = _problem(q, k, causal, default_scale(q, softmax_scale), attn_mask, key_padding_mask,
                    cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, config)
    out, lse = FlashAttentionFunction.apply(q.contiguous(), k.contiguous(), v.contiguous(), prob)
    return (out, lse) if return_lse else out


def _problem(q, k, causal, scale, attn_mask, key_padding_mask, cu_q, cu_k, max_q, max_k, config):
    config = config or default_config(q.shape[-1], interpret=not q.is_cuda)
    if cu_q is not None:
        cu_q, cu_k = cu_q.to(torch.int32).contiguous(), cu_k.to(torch.int32).contiguous()
        max_q = int(cu_q.diff().max()) if max_q is None else int(max_q)
        max_k = int(cu_k.diff().max()) if max_k is None else int(max_k)
        return AttentionProblem(causal, scale, max_q, max_k, config, cu_q=cu_q, cu_k=cu_k)
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros(attn_mask.shape, device=q.device).masked_fill(~attn_mask, float("-inf"))
        bias = attn_mask.expand(batch, heads, len_q, len_k)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.uint8).contiguous()
    return AttentionProblem(causal, scale, len_q, len_k, config, bias=bias, kpm=kpm)
