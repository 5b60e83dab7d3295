"""The prefix encoder: produces every layer's key/value prefix from trained parameters.

    no projection:  embedding (P, L*2*kv_dim) ───────────────────────────────► prefix
    projection:     embedding (P, kv_dim) ─► Linear ─► tanh ─► Linear ─► (P, L*2*kv_dim)

The projection (Li & Liang's reparameterisation) only helps optimisation: once
trained, ``fold()`` replaces it by its output, which is also what PEFT saves
as ``prompt_embeddings``.
"""

from __future__ import annotations

import torch
from torch import nn


class PrefixEncoder(nn.Module):
    """Trainable key/value prefixes of ``num_virtual_tokens`` positions for ``num_layers`` layers.

    Args:
        num_virtual_tokens: P.
        num_layers: L, attention layers that receive a prefix.
        kv_dim: width of one layer's keys (KV heads * head size).
        projection_size: hidden width of the reparameterisation MLP, or None for none.
        zero_init: start from zeros (the MLP's output layer, or the embedding).
    """

    def __init__(self, num_virtual_tokens: int, num_layers: int, kv_dim: int,
                 projection_size: int | None = None, zero_init: bool = False) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        width = num_layers * 2 * kv_dim
        self.transform: nn.Sequential | None = None
        if projection_size is None:
            self.embedding = nn.Embedding(num_virtual_tokens, width)
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, kv_dim)
            self.transform = nn.Sequential(
                nn.Linear(kv_dim, projection_size), nn.Tanh(), nn.Linear(projection_size, width)
            )
        if zero_init:
            target = self.transform[-1] if self.transform is not None else self.embedding
            for p in target.parameters():
                nn.init.zeros_(p)

    def forward(self) -> torch.Tensor:
        """The flat prefix, ``(P, L * 2 * kv_dim)``."""
        x = self.embedding.weight
        return self.transform(x) if self.transform is not None else x

    @property
    def folded(self) -> bool:
        return self.transform is None

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the reparameterisation MLP by the embedding it produces (outputs unchanged)."""
        if self.transform is None:
            return
        flat = self.forward().detach()
        trainable = self.embedding.weight.requires_grad
        self.embedding = nn.Embedding(*flat.shape, device=flat.device, dtype=flat.dtype)
        self.embedding.weight.copy_(flat)
        self.embedding.weight.requires_grad_(trainable)
        self.transform = None
