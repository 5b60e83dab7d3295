"""FlashAttention-style attention: fused Triton kernels (fwd + bwd) and a PyTorch reference.

``flash_attention`` picks the implementation per call with
``tunekit.kernels._dispatch.backend``: the Triton kernels for CUDA tensors (or
under ``use_backend("interpret")``), else ``flash_attention_ref``. Both have the
same signature and semantics. Triton is imported only when its backend is used.
"""

from __future__ import annotations

import warnings

import torch

from tunekit.kernels._dispatch import backend
from tunekit.kernels.flash_attention.reference import flash_attention_ref
from tunekit.kernels.flash_attention.varlen import cu_seqlens_from_position_ids

__all__ = ["cu_seqlens_from_position_ids", "flash_attention", "flash_attention_ref"]


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention, ``softmax(scale · Q Kᵀ + mask) V``, computed FlashAttention-style.

    Two layouts:
    - padded: q (B, H, Lq, D), k and v (B, KV, Lk, D);
    - packed (several sequences in one row, no attention across them): q (total_q, H, D),
      k and v (total_k, KV, D), with ``cu_seqlens_q/k`` = [0, len_0, len_0+len_1, ...].

    Args:
        q, k, v: see the layouts; ``H % KV == 0`` (query head h uses key/value head h // (H // KV)).
        causal: query i sees keys j <= i + (Lk - Lq): the diagonal is aligned bottom-right,
            so keys in front of the queries (prefix tuning, a KV cache) stay visible.
        softmax_scale: defaults to ``D ** -0.5``.
        attn_mask: padded layout only; bool (True = attend) or additive float, broadcastable
            to (B, H, Lq, Lk). Not differentiated by the kernel.
        key_padding_mask: padded layout only; (B, Lk), true/1 for real keys, false/0 for padding.
        cu_seqlens_q, cu_seqlens_k: (N + 1,) int32/int64 offsets of a packed batch
            (``cu_seqlens_from_position_ids`` builds them from restarting position ids).
        max_seqlen_q, max_seqlen_k: longest sequence of a packed batch; computed when omitted
            (a host sync on a GPU).
        return_lse: also return the fp32 log-sum-exp of the scaled, masked scores.

    Returns:
        out with q's shape and dtype (rows that see no key are 0); with ``return_lse`` also
        lse: (B, H, Lq) padded or (H, total_q) packed (-inf for rows that see no key).

    Inputs the kernel cannot take (head dim > 256, dtypes other than fp16/bf16/fp32, bf16
    under the interpreter, an ``attn_mask`` that requires grad, CPU tensors with backend
    "triton") run on the reference instead, with a warning.

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 16)
        >>> flash_attention(q, k, v, causal=True).shape
        torch.Size([1, 2, 5, 16])
    """
    kwargs = dict(causal=causal, softmax_scale=softmax_scale, attn_mask=attn_mask,
                  key_padding_mask=key_padding_mask, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                  max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, return_lse=return_lse)
    name = backend(q, k, v)
    if name == "reference":
        return flash_attention_ref(q, k, v, **kwargs)
    from tunekit.kernels.flash_attention import launch, triton_impl  # imports triton

    reason = triton_impl.unsupported_reason(q, attn_mask)
    if reason is None and name == "triton" and not q.is_cuda:
        reason = "backend 'triton' needs CUDA tensors (use 'interpret' with TRITON_INTERPRET=1 on a CPU)"
    if reason is not None:
        warnings.warn(f"flash_attention: {reason}; running the PyTorch reference", stacklevel=2)
        return flash_attention_ref(q, k, v, **kwargs)
    return launch.flash_attention_triton(q, k, v, **kwargs)
