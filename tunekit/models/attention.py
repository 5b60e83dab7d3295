"""``attn_implementation="tunekit"``: tunekit's FlashAttention behind transformers' AttentionInterface.

After ``register_tunekit_attention()`` any model whose attention goes through
``ALL_ATTENTION_FUNCTIONS`` (Llama, Mistral, Qwen, Gemma, GPT-2, BERT, ...) can be
built with ``attn_implementation="tunekit"``. Each call runs
``tunekit.kernels.flash_attention``: the Triton kernels on a GPU, the PyTorch
reference (same semantics) on a CPU.

Two registrations, both under the name "tunekit":

1. ``AttentionMaskInterface``: transformers' mask builders (``create_causal_mask``,
   ``create_bidirectional_mask``) hand the attention a (B, Lk) key-padding mask, or
   None when nothing is padded, as for FlashAttention-2: the kernel builds
   causality itself, so no (B, 1, Lq, Lk) mask is ever materialised.
2. ``AttentionInterface``: ``tunekit_attention_forward`` maps what a model passes
   onto ``flash_attention``:

   ========================================  ====================================
   model passes                              kernel gets
   ========================================  ====================================
   (B, Lk) padding mask                      ``key_padding_mask``
   (B, 1|H, Lq, Lk) mask (custom / prepared)  ``attn_mask`` (it already holds causality)
   no mask, FA kwargs ``cu_seq_lens_q/k``     packed batch with those offsets
   no mask, position ids restarting          packed batch, ``cu_seqlens_from_position_ids``
   Lk > Lq (KV cache, prefix keys)           bottom-right causal diagonal
   KV < H heads (GQA / MQA)                  native GQA, K/V never repeated
   ========================================  ====================================

Packed batches are recognised only when there is no padding mask and Lq == Lk
(training; transformers' SDPA path uses the same rule and the same boundary test).
Not supported, each with a clear error: attention dropout > 0, logit softcapping,
attention sinks, T5-style position bias, a sliding window shorter than the keys.
Static caches need the 2-D ``attention_mask`` (``generate()`` always passes it).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from tunekit.kernels.flash_attention import cu_seqlens_from_position_ids, flash_attention

__all__ = ["ATTN_IMPLEMENTATION", "register_tunekit_attention", "tunekit_attention_forward",
           "tunekit_attention_mask"]

ATTN_IMPLEMENTATION = "tunekit"
_UNSUPPORTED = {"softcap": "logit softcapping", "s_aux": "attention sinks", "position_bias": "a position bias"}


def register_tunekit_attention() -> str:
    """Register ``"tunekit"`` with transformers' attention and mask interfaces (idempotent).

    Returns:
        The name to pass as ``attn_implementation``.

    Example:
        >>> register_tunekit_attention()
        'tunekit'
    """
    AttentionInterface.register(ATTN_IMPLEMENTATION, tunekit_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, tunekit_attention_mask)
    return ATTN_IMPLEMENTATION


def tunekit_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask transformers builds for "tunekit": the (B, kv_length) bool padding mask, or None.

    The right-most ``kv_length`` columns are kept (a sliding cache keeps the latest
    keys); a shorter mask (static cache) is kept whole and trims the keys later.
    """
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def tunekit_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention for transformers' ``AttentionInterface``.

    Args:
        module: the calling attention module (reads ``is_causal``).
        query: (B, H, Lq, D); key, value: (B, KV, Lk, D), Lk >= Lq with a cache or prefix.
        attention_mask: None, a (B, Lm) padding mask (1 = token) or a (B, 1|H, Lq, Lk) mask.
        scaling: softmax scale (``D ** -0.5`` when None).
        dropout: must be 0.
        **kwargs: ``is_causal``, ``position_ids``, FlashAttention varlen kwargs; others ignored.

    Returns:
        (attn_output (B, Lq, H, D), None): attention weights are never materialised.
    """
    _reject_unsupported(module, key, dropout, kwargs)
    is_causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    if attention_mask is not None and attention_mask.ndim == 4:
        out = flash_attention(query, key, value, causal=False, softmax_scale=scaling, attn_mask=attention_mask)
    elif attention_mask is not None:
        if attention_mask.shape[-1] < key.shape[2]:  # static cache: slots past the mask are unfilled
            key, value = key[:, :, : attention_mask.shape[-1]], value[:, :, : attention_mask.shape[-1]]
        out = flash_attention(query, key, value, causal=causal, softmax_scale=scaling,
                              key_padding_mask=attention_mask[:, -key.shape[2]:])
    else:
        packed = _packed_offsets(query, key, kwargs)
        if packed is None:
            out = flash_attention(query, key, value, causal=causal, softmax_scale=scaling)
        else:
            return _packed_attention(query, key, value, causal, scaling, packed), None
    return out.transpose(1, 2).contiguous(), None


def _packed_offsets(query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> tuple | None:
    """(cu_q, cu_k, max_q, max_k) when the batch packs several sequences per row, else None."""
    if kwargs.get("cu_seq_lens_q") is not None and kwargs.get("cu_seq_lens_k") is not None:
        return (kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], kwargs.get("max_length_q"),
                kwargs.get("max_length_k"))
    position_ids = kwargs.get("position_ids")
    batch, _, len_q, _ = query.shape
    if position_ids is None or len_q == 1 or len_q != key.shape[2] or position_ids.shape[-1] != len_q:
        return None
    cu_seqlens, longest = cu_seqlens_from_position_ids(position_ids.expand(batch, -1))
    if cu_seqlens.numel() - 1 == batch:  # one sequence per row: the padded path is the same and cheaper
        return None
    return cu_seqlens, cu_seqlens, longest, longest


def _packed_attention(query, key, value, causal, scaling, packed) -> torch.Tensor:
    """Run a packed batch: (B, H, T, D) -> (B·T, H, D) tokens -> output (B, T, H, D)."""
    batch, heads, length, dim = query.shape
    cu_q, cu_k, max_q, max_k = packed
    flat = [t.transpose(1, 2).reshape(-1, t.shape[1], dim) for t in (query, key, value)]  # (B·T, heads, D)
    out = flash_attention(*flat, causal=causal, softmax_scale=scaling, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                          max_seqlen_q=None if max_q is None else int(max_q),
                          max_seqlen_k=None if max_k is None else int(max_k))
    return out.reshape(batch, length, heads, dim)


def _reject_unsupported(module: torch.nn.Module, key: torch.Tensor, dropout: float, kwargs: dict) -> None:
    where = type(module).__name__
    if dropout:
        raise ValueError(f"attn_implementation='tunekit' has no attention dropout ({where} asks for {dropout}); "
                         "set the model config's attention dropout to 0, or use attn_implementation='sdpa'")
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(f"attn_implementation='tunekit' does not support {what} ({name}, from {where}); "
                             "use attn_implementation='sdpa' or 'eager' for this model")
    window = kwargs.get("sliding_window")
    if window is not None and key.shape[2] > window:
        raise ValueError(f"attn_implementation='tunekit' has no sliding window ({window} < {key.shape[2]} keys in "
                         f"{where}); use attn_implementation='sdpa' for this model or shorter sequences")
