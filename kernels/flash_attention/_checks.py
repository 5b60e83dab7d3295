"""Argument checks shared by the reference and the Triton path of ``flash_attention``.

Both implementations accept exactly the same inputs, so they validate them in one
place; every problem is reported as a one-line ``ValueError`` that names the
argument and the expected shape.
"""

from __future__ import annotations

import torch

__all__ = ["check_inputs", "default_scale"]


def default_scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    """The softmax scale: ``softmax_scale`` or ``1/sqrt(D)``."""
    return q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
) -> None:
    """Validate shapes, dtypes and the combination of options.

    Raises:
        ValueError: naming the offending argument and what it should be.
    """
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        raise ValueError(f"q, k, v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("pass both cu_seqlens_q and cu_seqlens_k (packed batch) or neither (padded batch)")
    if cu_seqlens_q is None:
        _check_dense(q, k, attn_mask, key_padding_mask)
    else:
        _check_varlen(q, k, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k)
    heads, kv_heads = q.shape[1], k.shape[1]
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[-1]} and {k.shape[-1]}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of key/value heads ({kv_heads}) for GQA")


def _check_dense(q, k, attn_mask, key_padding_mask) -> None:
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(
            f"padded layout needs q (B, H, Lq, D) and k, v (B, KV, Lk, D), got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}; for packed (T, H, D) inputs pass cu_seqlens_q/cu_seqlens_k"
        )
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    batch, heads, len_q, _ = q.shape
    len_k = k.shape[2]
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, len_k):
        raise ValueError(f"key_padding_mask must be (B, Lk) = {(batch, len_k)}, got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        full = (batch, heads, len_q, len_k)
        fits = attn_mask.ndim <= 4 and all(m in (1, f) for m, f in zip(attn_mask.shape[::-1], full[::-1]))
        if not fits:
            raise ValueError(f"attn_mask {tuple(attn_mask.shape)} does not broadcast to (B, H, Lq, Lk) = {full}")


def _check_varlen(q, k, attn_mask, key_padding_mask, cu_q, cu_k) -> None:
    if q.ndim != 3 or k.ndim != 3:
        raise ValueError(
            f"packed layout needs q (total_q, H, D) and k, v (total_k, KV, D), got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if attn_mask is not None or key_padding_mask is not None:
        raise ValueError("a packed batch (cu_seqlens) takes no attn_mask/key_padding_mask: boundaries already mask it")
    for name, cu, total in (("cu_seqlens_q", cu_q, q.shape[0]), ("cu_seqlens_k", cu_k, k.shape[0])):
        if cu.ndim != 1 or cu.dtype not in (torch.int32, torch.int64) or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor [0, len_0, len_0+len_1, ...]")
        # Value checks read the tensor; on a GPU that is a host sync per call, so trust the caller there.
        # On the host one tolist() reads it without a tensor op per value (no aten::item per layer).
        if cu.is_cuda:
            continue
        values = cu.tolist()
        if values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name} must rise from 0 to the token count {total}, got {values}")
    if cu_q.numel() != cu_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must count the same sequences, got {cu_q.numel() - 1} "
                         f"and {cu_k.numel() - 1}")
