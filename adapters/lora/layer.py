"""The LoRA wrapper: a frozen linear-like ``base_layer`` plus named low-rank branches.

    x ──► base_layer (W, frozen) ───────────────► (+) ──► y
     └──► dropout ──► lora_A (r×in) ──► lora_B (out×r) ──► ·s ──┘

Parameter names (``lora_A``/``lora_B`` ``nn.Linear``s, ``lora_magnitude_vector``)
are PEFT's, so a saved adapter maps to PEFT's keys by a prefix.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from tunekit.adapters.hf.layers import (
    adapter_dtype,
    base_weight,
    dequantized_linear,
    is_quantized,
    linear_features,
    write_linear,
)
from tunekit.adapters.host import AdapterLayer
from tunekit.adapters.lora.config import LoRAConfig
from tunekit.adapters.lora.variants import DoRAVariant, LoRAVariant
from tunekit.kernels import lora_linear


class LoRABranch(nn.Module):
    """One named LoRA adapter on one layer: ``lora_A``, ``lora_B``, scaling, variant."""

    def __init__(self, base_layer: nn.Module, cfg: LoRAConfig) -> None:
        super().__init__()
        in_f, out_f = linear_features(base_layer)
        ref = base_weight(base_layer)
        dtype = adapter_dtype(base_layer)
        self.lora_A = nn.Linear(in_f, cfg.rank, bias=False, device=ref.device, dtype=dtype)
        self.lora_B = nn.Linear(cfg.rank, out_f, bias=False, device=ref.device, dtype=dtype)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling = cfg.scaling
        self.variant = DoRAVariant() if cfg.use_dora else LoRAVariant()
        self.reset_parameters(cfg.init, cfg.rank)
        self.variant.init(self, ref.detach())

    @torch.no_grad()
    def reset_parameters(self, init: str, rank: int) -> None:
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init == "random":
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B.weight)


class LoRALayer(AdapterLayer):
    """Wraps ``nn.Linear``, transformers ``Conv1D`` or a bitsandbytes 4/8-bit linear."""

    # HF code reads some projections' weight directly (T5 checks ``self.wo.weight.dtype``);
    # expose the base's, as PEFT's tuner layers do, without forwarding every attribute.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def _weight(self) -> torch.Tensor:
        return base_weight(self.base_layer)

    def _fused_ok(self, names: list[str], x: torch.Tensor) -> bool:
        # The fused path bypasses base_layer.forward, so only for a plain nn.Linear
        # without hooks (tensor-parallel and FSDP hooks must still run); and not under
        # autocast, which does not reach into a custom autograd Function.
        base = self.base_layer
        if len(names) != 1 or type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return False
        if torch.is_autocast_enabled(x.device.type):
            return False
        branch = self.adapters[names[0]]
        return type(branch.variant) is LoRAVariant and isinstance(branch.dropout, nn.Identity)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        names = self.unmerged_active()
        if not names:
            return self.base_layer(x, *args, **kwargs)
        if self._fused_ok(names, x):
            branch = self.adapters[names[0]]
            if x.dtype == branch.lora_A.weight.dtype == self.base_layer.weight.dtype:
                base = self.base_layer
                return lora_linear(x, base.weight, base.bias, branch.lora_A.weight, branch.lora_B.weight, branch.scaling)
        result = self.base_layer(x, *args, **kwargs)
        out_dtype = result.dtype
        for name in names:
            branch = self.adapters[name]
            xa = x.to(branch.lora_A.weight.dtype)
            result = branch.variant.forward(branch, xa, result.to(xa.dtype), self.base_layer, self._weight)
        return result.to(out_dtype)

    # -- merging -----------------------------------------------------------
    def cannot_merge_reason(self, names: list[str]) -> str | None:
        if names and is_quantized(self.base_layer):
            return (
                "cannot merge LoRA into a quantized (bitsandbytes) base in place: use eject_adapters(model, merge=True), "
                "which dequantizes, or load the base in full precision (tunekit merge)"
            )
        return None

    def cannot_eject_merged_reason(self, names: list[str]) -> str | None:
        return None  # a quantized base is dequantized on eject

    def _fold(self, name: str, safe: bool) -> None:
        branch = self.adapters[name]
        write_linear(self.base_layer, branch.variant.merged_weight(branch, self._weight()), safe=safe)

    def eject(self, merge: bool) -> nn.Module:
        if merge and is_quantized(self.base_layer):
            # dequantize -> merge: the result is a plain linear layer in the compute dtype
            dtype = getattr(self.base_layer, "compute_dtype", None) or torch.float32
            self.base_layer = dequantized_linear(self.base_layer, dtype)
        return super().eject(merge)
