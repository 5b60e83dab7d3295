"""Linear-like base modules LoRA can wrap: ``nn.Linear``, transformers' ``Conv1D``
(GPT-2; weight stored transposed, ``(in, out)``), and bitsandbytes' ``Linear4bit``
/ ``Linear8bitLt`` (quantized, so their weight must be dequantized to be read).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

SUPPORTED_LINEAR_TYPES = "nn.Linear, transformers Conv1D, bitsandbytes Linear4bit / Linear8bitLt"


def is_conv1d(module: nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def _bnb_kind(module: nn.Module) -> str | None:
    name = type(module).__name__
    if name in ("Linear4bit", "LinearNF4", "LinearFP4") and type(module).__module__.startswith("bitsandbytes"):
        return "4bit"
    if name == "Linear8bitLt" and type(module).__module__.startswith("bitsandbytes"):
        return "8bit"
    return None


def is_quantized(module: nn.Module) -> bool:
    return _bnb_kind(module) is not None


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like module."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def base_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight as a dense ``(out, in)`` tensor (dequantized if needed)."""
    kind = _bnb_kind(module)
    if kind == "4bit":
        import bitsandbytes.functional as bnbF

        weight = module.weight
        if weight.quant_state is None:
            raise RuntimeError("bitsandbytes 4-bit weight is not quantized yet: move the model .to(device) first")
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes repacks 4-bit weights in place for its AVX512-bf16 CPU path on the
            # first eval/no-grad forward; dequantize_4bit reads that layout wrong, so undo it on a copy.
            data, state = bnbF._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return bnbF.dequantize_4bit(data, state)
    if kind == "8bit":
        weight = module.weight
        if weight.dtype != torch.int8:  # has_fp16_weights, or not quantized yet
            return weight.data
        # Row-wise absmax scales: on the weight until the first forward, then in module.state.
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return weight.data.float() * scales.float().unsqueeze(1) / 127.0
    if is_conv1d(module):
        return module.weight.T
    return module.weight


def write_linear(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None = None, safe: bool = True) -> None:
    """Give a linear-like module a dense ``(out, in)`` weight (and bias), in its own layout and dtype.

    The values go into NEW Parameters that replace the module's (same dtype, device and
    ``requires_grad``); the old ones are not written, so a caller may keep them to put
    back, and a weight tied to another module is left as it was. With ``safe``,
    refuses (before changing anything) values that are not finite.
    """
    if safe and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
        raise ValueError("merged weight has NaN/Inf values; the adapter is broken, nothing was changed")
    with torch.no_grad():
        layout = weight.T if is_conv1d(module) else weight
        module.weight = _replacing(module.weight, layout)
        if bias is not None:
            module.bias = _replacing(module.bias, bias)


def _replacing(old: nn.Parameter, values: torch.Tensor) -> nn.Parameter:
    new = torch.empty(old.shape, dtype=old.dtype, device=old.device)
    new.copy_(values)  # one rounding to the module's dtype
    return nn.Parameter(new, requires_grad=old.requires_grad)


def adapter_dtype(base: nn.Module) -> torch.dtype:
    """The dtype adapter weights beside ``base`` train in.

    fp32 beside a half-precision (bf16/fp16) or quantized base, as PEFT's default
    ``autocast_adapter_dtype``: optimizer updates of small low-rank weights vanish in
    bf16. Beside an fp32/fp64 base, its dtype. Forwards cast inputs to it and back.
    """
    ref = next((p for p in base.parameters() if p.is_floating_point()), None)
    if ref is None or is_quantized(base) or ref.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return ref.dtype


def keep_4bit_layout_trainable(model: nn.Module) -> int:
    """Keep every bitsandbytes 4-bit layer of ``model`` on its trainable CPU layout; returns how many.

    bitsandbytes 0.50's CPU fast path repacks a 4-bit weight in place on the first
    forward in eval mode without grad; from then on no gradient flows back through
    the layer, so adapters *before* it silently stop learning. This per-module switch
    turns that path off, and a weight already repacked is converted back (its absmax
    keeps the bf16 rounding the repack applied).
    """
    count = 0
    for module in model.modules():
        if _bnb_kind(module) != "4bit":
            continue
        module.support_avx512bf16_for_cpu = False
        weight = module.weight
        if getattr(weight.quant_state, "packing_format_for_cpu", False):
            import bitsandbytes.functional as bnbF

            weight.data, weight.quant_state = bnbF._convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)
        count += 1
    return count


def dequantized_linear(module: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """A plain ``nn.Linear`` holding the (dequantized) weight of ``module``."""
    in_f, out_f = linear_features(module)
    weight = base_weight(module).detach()
    linear = nn.Linear(in_f, out_f, bias=module.bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight.to(dtype))
        if module.bias is not None:
            linear.bias.copy_(module.bias.detach().to(dtype))
    return linear
