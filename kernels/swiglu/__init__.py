"""Gated activations (SwiGLU, GeGLU): public ops dispatching per call to Triton or the reference."""

from __future__ import annotations

import torch

from tunekit.kernels._dispatch import backend
from tunekit.kernels.swiglu.reference import Activation, geglu_ref, glu_ref, swiglu_ref


def glu(gate: torch.Tensor, up: torch.Tensor, act: Activation = "silu") -> torch.Tensor:
    """``act(gate) * up`` computed in fp32, rounded once; gate, up: (..., I) -> (..., I)."""
    if act not in ("silu", "gelu_tanh"):
        raise ValueError(f"unknown gated activation {act!r}; choose 'silu' or 'gelu_tanh'")
    which = backend(gate, up)
    if which == "reference":
        return glu_ref(gate, up, act)
    from tunekit.kernels.swiglu.triton_impl import SwiGLUFunction

    return SwiGLUFunction.apply(gate, up, act)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (Llama MLP); gate, up: (..., I)."""
    return glu(gate, up, "silu")


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu_tanh(gate) * up`` (Gemma MLP); gate, up: (..., I)."""
    return glu(gate, up, "gelu_tanh")


__all__ = ["Activation", "geglu", "geglu_ref", "glu", "glu_ref", "swiglu", "swiglu_ref"]
