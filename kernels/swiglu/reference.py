"""Reference gated activations ``act(gate) · up`` (the middle of a gated MLP).

- SwiGLU: act = SiLU, ``silu(g) = g · sigmoid(g)`` (Llama, Mistral, Qwen).
- GeGLU: act = tanh-approximated GELU, ``0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³)))``
  (Gemma's ``gelu_pytorch_tanh``).

Shazeer, "GLU Variants Improve Transformer" (2020).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Activation = Literal["silu", "gelu_tanh"]


def _act(g: torch.Tensor, act: Activation) -> torch.Tensor:
    if act == "silu":
        return F.silu(g)
    if act == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    raise ValueError(f"unknown gated activation {act!r}; choose 'silu' or 'gelu_tanh'")


def glu_ref(gate: torch.Tensor, up: torch.Tensor, act: Activation = "silu", upcast: bool = True) -> torch.Tensor:
    """``act(gate) * up``.

    Args:
        gate, up: (..., I), same shape and dtype.
        act: ``"silu"`` or ``"gelu_tanh"``.
        upcast: compute in fp32 and round once (the kernel's precision); ``False``
            rounds after the activation as transformers' eager MLP does.

    Returns:
        (..., I) in the input dtype.
    """
    if upcast:
        return (_act(gate.float(), act) * up.float()).to(gate.dtype)
    return _act(gate, act) * up


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """``silu(gate) * up``; gate, up: (..., I)."""
    return glu_ref(gate, up, "silu", upcast)


def geglu_ref(gate: torch.Tensor, up: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """``gelu_tanh(gate) * up``; gate, up: (..., I)."""
    return glu_ref(gate, up, "gelu_tanh", upcast)
