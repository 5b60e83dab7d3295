"""Merging a saved LoRA / DoRA adapter into base weights given as a state dict (no modules).

For checkpoints that never sit in one model: a sharded run's base is streamed
from its safetensors shards and merged one shard at a time (torchtune's
``get_merged_lora_ckpt``). The math is ``LoRALayer``'s merge, in fp32::

    LoRA   W' = W + s · B A
    DoRA   W' = m / ‖W + s · B A‖_row · (W + s · B A)

with ``W`` as ``(out, in)`` (transformers' ``Conv1D`` stores ``(in, out)``:
``fan_in_fan_out``). Other saved tensors (``modules_to_save`` copies, trained
biases) replace the base tensor of the same name, as ``eject_adapters(merge=True)``
keeps them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from tunekit.adapters.config import AdapterConfig
from tunekit.adapters.hf.peft_format import strip_peft_prefix

_FACTORS = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "m"}


@dataclass
class MergedState:
    """The merged tensors of one chunk of base weights, and the adapter keys that found their base tensor."""

    state: dict[str, torch.Tensor]
    used: set[str] = field(default_factory=set)


def _split(adapter_state: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, tuple[str, torch.Tensor]]], dict]:
    """(module path -> {"A"|"B"|"m": (saved key, tensor)}, base key -> (saved key, replacement))."""
    factors: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    direct: dict[str, tuple[str, torch.Tensor]] = {}
    stripped = strip_peft_prefix(dict(adapter_state))
    original = dict(zip(stripped, adapter_state))
    for key, value in stripped.items():
        factor = next((f for f in _FACTORS if key.endswith("." + f)), None)
        if factor is not None:
            factors.setdefault(key[: -len(factor) - 1], {})[_FACTORS[factor]] = (original[key], value)
        else:
            direct[key.replace(".base_layer.", ".")] = (original[key], value)
    return factors, direct


def _merged_weight(weight: torch.Tensor, parts: dict, scaling: float, fan_in_fan_out: bool, path: str) -> torch.Tensor:
    if "A" not in parts or "B" not in parts:
        raise ValueError(f"adapter for {path!r} lacks lora_A or lora_B; the saved adapter is incomplete")
    w = weight.float().T if fan_in_fan_out else weight.float()  # (out, in)
    a, b = parts["A"][1].float(), parts["B"][1].float()  # (r, in), (out, r)
    if w.shape != (b.shape[0], a.shape[1]):
        raise ValueError(f"adapter for {path!r} is {b.shape[0]}x{a.shape[1]} but the base weight is "
                         f"{tuple(w.shape)}: was it trained on another model (or fan_in_fan_out is wrong)?")
    merged = w + scaling * (b @ a)
    if "m" in parts:
        merged = (parts["m"][1].float() / merged.norm(p=2, dim=1)).unsqueeze(1) * merged
    if not bool(torch.isfinite(merged).all()):
        raise ValueError(f"merging {path!r} gives NaN/Inf values; the adapter is broken, nothing was written")
    return (merged.T if fan_in_fan_out else merged).to(weight.dtype).contiguous()


def merge_state_dict(state: Mapping[str, torch.Tensor], adapter_state: Mapping[str, torch.Tensor],
                     adapter_cfg: AdapterConfig, *, fan_in_fan_out: bool = False) -> MergedState:
    """``state`` (base tensors under their model keys; any subset, e.g. one safetensors shard) with the adapter merged in.

    Args:
        state: base weights, e.g. ``{"model.layers.0.self_attn.q_proj.weight": W, ...}``.
        adapter_state: the saved adapter's tensors (PEFT keys, ``base_model.model.`` prefix or not).
        adapter_cfg: its ``LoRAConfig`` (``read_adapter_config`` gives it).
        fan_in_fan_out: the base stores weights ``(in, out)`` (GPT-2's ``Conv1D``).

    Returns:
        The merged tensors (unchanged ones shared with ``state``) and which adapter keys were used,
        so a caller streaming several shards can check that every adapter tensor found its weight.

    Raises:
        ValueError: not a LoRA adapter, an incomplete or mis-shaped one, or a non-finite result.
    """
    if adapter_cfg.method != "lora":
        raise ValueError(f"only LoRA / DoRA adapters merge into base weights; this one is {adapter_cfg.method!r} "
                         "(load it beside the base instead)")
    factors, direct = _split(adapter_state)
    out = MergedState(dict(state))
    for path, parts in factors.items():
        key = f"{path}.weight"
        if key in state:
            out.state[key] = _merged_weight(state[key], parts, adapter_cfg.scaling, fan_in_fan_out, path)
            out.used |= {saved for saved, _ in parts.values()}
    for key, (saved, value) in direct.items():
        if key in state:
            if tuple(value.shape) != tuple(state[key].shape):
                raise ValueError(f"saved {saved!r} has shape {tuple(value.shape)}, the base's {key!r} "
                                 f"{tuple(state[key].shape)}: was it trained on another model?")
            out.state[key] = value.to(state[key].dtype).contiguous()
            out.used.add(saved)
    return out
