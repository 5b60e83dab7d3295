"""Reference rotary position embedding (RoPE) with transformers' ``rotate_half`` layout.

    rotate_half(x) = cat(-x2, x1)          (x1, x2 = first and second half of head_dim)
    q' = q·cos + rotate_half(q)·sin         (same for k)

``cos``/``sin`` are (B, T, D) as returned by the HF rotary embedding module
(``cat(freqs, freqs)``), unsqueezed at ``unsqueeze_dim`` to broadcast over heads:
``unsqueeze_dim=1`` for q/k in (B, H, T, D), ``2`` for (B, T, H, D).
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k.

    Args:
        q: (B, Hq, T, D) (or (B, T, Hq, D) with ``unsqueeze_dim=2``).
        k: (B, Hk, T, D) likewise.
        cos, sin: (B, T, D) or (1, T, D).
        unsqueeze_dim: where the head axis is.
        upcast: compute in fp32 and round once (the Triton kernel's precision);
            ``False`` is transformers' arithmetic in the input dtype.

    Returns:
        (q_embed, k_embed), same shapes and dtypes as q and k.
    """
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    if upcast:
        cos, sin = cos.float(), sin.float()
    out = []
    for t in (q, k):
        x = t.float() if upcast else t
        out.append((x * cos + _rotate_half(x) * sin).to(t.dtype))
    return out[0], out[1]
