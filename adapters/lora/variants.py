"""LoRA variants as strategy objects: how the update is initialised, what weight
delta it adds, and how it changes the forward. Plain LoRA and DoRA match
PEFT's math (``peft.tuners.lora.layer`` / ``dora.py``), so the same weights give
the same outputs.

Plain LoRA:  y = W x + b + s · B A x
DoRA:        W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row   (norm detached, as in the paper §4.3)
             y  = (m/‖·‖ − 1) ⊙ (W x) + m/‖·‖ ⊙ s·B A x + W x + b
"""

from __future__ import annotations

import torch
from torch import nn


class LoRAVariant:
    """Plain LoRA."""

    def init(self, branch: nn.Module, weight: torch.Tensor) -> None:
        """Set up extra state from the base weight ``(out, in)``; plain LoRA has none."""

    @staticmethod
    def low_rank_delta(branch: nn.Module) -> torch.Tensor:
        """``s · B A`` in fp32, ``(out, in)``."""
        return branch.scaling * (branch.lora_B.weight.float() @ branch.lora_A.weight.float())

    def merged_weight(self, branch: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """The fp32 ``(out, in)`` weight that merging writes in place of ``weight``."""
        return weight.float() + self.low_rank_delta(branch)

    def forward(self, branch: nn.Module, x: torch.Tensor, base_out: torch.Tensor, base_layer, weight_fn) -> torch.Tensor:
        """Add this branch to ``base_out`` (``x`` already cast to the adapter dtype)."""
        return base_out + branch.lora_B(branch.lora_A(branch.dropout(x))) * branch.scaling


class DoRAVariant(LoRAVariant):
    """Weight-decomposed LoRA (Liu et al., 2024, arXiv:2402.09353)."""

    def init(self, branch: nn.Module, weight: torch.Tensor) -> None:
        with torch.no_grad():
            norm = self._weight_norm(branch, weight)
        branch.lora_magnitude_vector = nn.Parameter(norm.to(branch.lora_A.weight.dtype))

    def _weight_norm(self, branch: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return (weight.float() + self.low_rank_delta(branch)).norm(p=2, dim=1)

    def merged_weight(self, branch: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        combined = weight.float() + self.low_rank_delta(branch)
        norm = combined.norm(p=2, dim=1).detach()
        return (branch.lora_magnitude_vector.float() / norm).unsqueeze(1) * combined

    def row_norm(self, combined: torch.Tensor) -> torch.Tensor:
        """``‖W + s·B A‖`` per output row, detached (a subclass may finish a sharded reduction here)."""
        return combined.norm(p=2, dim=1).detach()

    def forward(self, branch: nn.Module, x: torch.Tensor, base_out: torch.Tensor, base_layer, weight_fn) -> torch.Tensor:
        weight = weight_fn().to(x.dtype)
        lora_weight = (branch.lora_B.weight @ branch.lora_A.weight).detach()
        weight_norm = self.row_norm(weight + branch.scaling * lora_weight)
        mag_norm_scale = branch.lora_magnitude_vector / weight_norm
        if isinstance(branch.dropout, nn.Identity) or not branch.training:
            bias = base_layer.bias
            plain = base_out - bias if bias is not None else base_out
        else:
            x = branch.dropout(x)  # as PEFT: one dropped input feeds both the base term and the branch
            plain = nn.functional.linear(x, weight)
        lora_out = branch.lora_B(branch.lora_A(x))
        return base_out + (mag_norm_scale - 1) * plain + mag_norm_scale * lora_out * branch.scaling
