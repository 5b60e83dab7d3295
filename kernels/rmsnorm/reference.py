"""Reference RMSNorm in plain PyTorch (the CPU path and the test oracle).

    y = x / sqrt(mean(x², -1) + eps) · (w + offset)

``offset=0`` is Llama/Mistral/Qwen (``LlamaRMSNorm``); ``offset=1`` is Gemma,
whose weight is stored as ``w - 1`` (``GemmaRMSNorm``). The two families also
round at different places in low precision, selected by ``casting``:

- ``"llama"``: normalise in fp32, round to the input dtype, then multiply by
  the weight (result dtype = promotion of input and weight dtypes);
- ``"gemma"``: normalise and multiply in fp32, round once to the input dtype.
"""

from __future__ import annotations

from typing import Literal

import torch

Casting = Literal["llama", "gemma"]


def rmsnorm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    offset: float = 0.0,
    casting: Casting = "llama",
    upcast: bool = True,
) -> torch.Tensor:
    """RMSNorm over the last dimension.

    Args:
        x: (..., H) input.
        weight: (H,) scale.
        eps: added to the mean square.
        offset: added to the weight (1.0 for Gemma).
        casting: where low-precision rounding happens (see module docstring).
        upcast: compute the statistics in fp32 (as transformers does); ``False``
            keeps everything in ``x.dtype`` (the naive low-precision baseline).

    Returns:
        (..., H) normalised tensor.
    """
    in_dtype = x.dtype
    h = x.float() if upcast else x
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if casting == "gemma":
        w = weight.float() if upcast else weight
        return (h * (w + offset)).to(in_dtype)
    if casting != "llama":
        raise ValueError(f"unknown RMSNorm casting {casting!r}; choose 'llama' or 'gemma'")
    return (weight + offset) * h.to(in_dtype)
