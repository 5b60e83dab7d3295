"""Pure-PyTorch attention with FlashAttention's semantics: the CPU path and the test oracle.

    O = softmax(scale · Q Kᵀ + bias) V        lse = logsumexp(scale · Q Kᵀ + bias)   (per query row)

where ``bias`` is 0 for visible keys and -inf for hidden ones, plus an optional
additive float mask. A key j is visible to query i when all of these hold:

- causal: ``j <= i + (Lk - Lq)``. The diagonal is aligned **bottom-right**, so
  extra keys in front of the queries (prefix-tuning prefixes, a KV cache) stay
  visible to every query. ``F.scaled_dot_product_attention(is_causal=True)`` is
  top-left aligned and would hide them, so the mask is built explicitly here.
- key padding: ``key_padding_mask[b, j]`` is true (1 = real token, 0 = padding,
  the Hugging Face / FlashAttention convention; the opposite of
  ``nn.MultiheadAttention``).
- packed batch: i and j belong to the same sequence of ``cu_seqlens_q/k``.

A query row that sees no key at all returns 0 and ``lse = -inf`` (FlashAttention's
convention); torch's SDPA would return NaN, so such rows are computed unmasked
and zeroed afterwards, which also keeps their gradients at exactly 0.

Grouped-query heads use SDPA's ``enable_gqa`` (query head h reads key/value
head ``h // (H // KV)``). Computation runs in the input dtype, as SDPA does;
``lse`` is computed separately in fp32 and only when asked for.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunekit.kernels.flash_attention._checks import check_inputs, default_scale

__all__ = ["flash_attention_ref", "visibility_bias"]


def flash_attention_ref(
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
    """Reference attention; same signature and semantics as ``flash_attention``.

    Args:
        q: (B, H, Lq, D) padded layout, or (total_q, H, D) when ``cu_seqlens_q`` is given.
        k, v: (B, KV, Lk, D), or (total_k, KV, D) packed; ``H % KV == 0``.
        causal: bottom-right aligned causal mask (see module docstring).
        softmax_scale: defaults to ``D ** -0.5``.
        attn_mask: padded layout only; bool (True = attend) or additive float,
            broadcastable to (B, H, Lq, Lk).
        key_padding_mask: padded layout only; (B, Lk), true/1 for real keys.
        cu_seqlens_q, cu_seqlens_k: (N + 1,) int32/int64 sequence offsets of a packed batch.
        max_seqlen_q, max_seqlen_k: unused here (the Triton path sizes its grid with them).
        return_lse: also return the fp32 log-sum-exp of the scaled scores.

    Returns:
        out with q's shape and dtype; with ``return_lse`` also lse, fp32, (B, H, Lq)
        padded or (H, total_q) packed.
    """
    check_inputs(q, k, v, attn_mask, key_padding_mask, cu_seqlens_q, cu_seqlens_k)
    scale = default_scale(q, softmax_scale)
    if cu_seqlens_q is None:
        out, lse = _dense(q, k, v, causal, scale, attn_mask, key_padding_mask, return_lse)
    else:
        out, lse = _packed(q, k, v, causal, scale, cu_seqlens_q, cu_seqlens_k, return_lse)
    return (out, lse) if return_lse else out


def visibility_bias(
    len_q: int,
    len_k: int,
    *,
    causal: bool,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """The additive fp32 bias: 0 where visible, -inf where hidden, plus ``attn_mask``.

    Returns:
        None when nothing is masked, else a tensor broadcastable to (B, H, Lq, Lk).
    """
    bias = None
    if causal:
        visible = torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril(diagonal=len_k - len_q)
        bias = _to_bias(visible)
    if key_padding_mask is not None:
        bias = _add(bias, _to_bias(key_padding_mask.bool()[:, None, None, :]))
    if attn_mask is not None:
        bias = _add(bias, _to_bias(attn_mask) if attn_mask.dtype == torch.bool else attn_mask.float())
    return bias


def _to_bias(visible: torch.Tensor) -> torch.Tensor:
    return torch.zeros(visible.shape, device=visible.device).masked_fill(~visible, float("-inf"))


def _add(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else a + b


def _dense(q, k, v, causal, scale, attn_mask, key_padding_mask, return_lse):
    len_q, len_k = q.shape[2], k.shape[2]
    if len_k == 0:  # an empty sequence of a packed batch: nothing to attend to
        lse = q.new_full(q.shape[:3], float("-inf"), dtype=torch.float32) if return_lse else None
        return torch.zeros_like(q), lse
    gqa = q.shape[1] != k.shape[1]
    if causal and len_q == len_k and attn_mask is None and key_padding_mask is None:
        # Equal lengths: bottom-right and top-left alignment coincide and no row is empty,
        # so SDPA's own causal path is exact and builds no (Lq, Lk) mask (2x faster on a CPU).
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        lse = _lse(q, k, scale, visibility_bias(len_q, len_k, causal=True, device=q.device)) if return_lse else None
        return out, lse
    if attn_mask is not None and attn_mask.dtype != torch.bool:  # additive float mask: SDPA takes the bias
        mask = visibility_bias(len_q, len_k, causal=causal, attn_mask=attn_mask,
                               key_padding_mask=key_padding_mask, device=q.device)
        seen = ~torch.isneginf(mask).all(dim=-1, keepdim=True)
        mask = mask.masked_fill(~seen, 0.0).to(q.dtype)
    else:  # bool visibility: a quarter of an fp32 bias (padded batches, prefix keys)
        mask = _visible(len_q, len_k, causal, attn_mask, key_padding_mask, q.device)
        seen = mask.any(dim=-1, keepdim=True) if mask is not None else None
        mask = mask | ~seen if mask is not None else None
    # A row that sees no key would be NaN in SDPA: it is unmasked above and zeroed here (so are its grads).
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    if seen is not None:
        out = out.masked_fill(~seen, 0.0)
    lse = None
    if return_lse:
        lse = _lse(q, k, scale, visibility_bias(len_q, len_k, causal=causal, attn_mask=attn_mask,
                                                key_padding_mask=key_padding_mask, device=q.device))
    return out, lse


def _visible(len_q, len_k, causal, attn_mask, key_padding_mask, device) -> torch.Tensor | None:
    """Bool visibility (True = attend), broadcastable to (B, H, Lq, Lk); None when all is visible."""
    visible = None
    if causal:
        visible = torch.ones(len_q, len_k, dtype=torch.bool, device=device).tril(diagonal=len_k - len_q)
    for extra in (key_padding_mask.bool()[:, None, None, :] if key_padding_mask is not None else None, attn_mask):
        if extra is not None:
            visible = extra if visible is None else visible & extra
    return visible


def _lse(q: torch.Tensor, k: torch.Tensor, scale: float, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 log-sum-exp of the biased scores, (B, H, Lq); not differentiated."""
    with torch.no_grad():
        kf = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)  # (B, H, Lk, D)
        scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale  # (B, H, Lq, Lk)
        if bias is not None:
            scores = scores + bias
        return torch.logsumexp(scores, dim=-1)


def _packed(q, k, v, causal, scale, cu_q, cu_k, return_lse):
    """Loop over the sequences of a packed batch: (T, H, D) pieces -> (1, H, L, D) calls.

    ``split`` rather than one slice per sequence: its backward is one concatenation, where every
    slice's backward would zero-fill a gradient as large as the whole batch.
    """
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    lengths_q = [b - a for a, b in zip(bounds_q, bounds_q[1:])]
    lengths_k = [b - a for a, b in zip(bounds_k, bounds_k[1:])]
    pieces = zip(q.split(lengths_q), k.split(lengths_k), v.split(lengths_k))
    outs, lses = [], []
    for qi, ki, vi in pieces:
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (qi, ki, vi))  # (1, H | KV, L_i, D)
        out, lse = _dense(qi, ki, vi, causal, scale, None, None, return_lse)
        outs.append(out[0].transpose(0, 1))  # (Lq_i, H, D)
        lses.append(lse[0] if return_lse else None)  # (H, Lq_i)
    out = torch.cat(outs, dim=0)
    return out, (torch.cat(lses, dim=1) if return_lse else None)
