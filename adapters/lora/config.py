"""LoRA configuration, and its one mapping to PEFT's ``adapter_config.json`` fields."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field

from tunekit.adapters.config import AdapterConfig


class LoRAConfig(AdapterConfig):
    """Low-Rank Adaptation (Hu et al., 2021), with rsLoRA scaling and DoRA.

    Example:
        >>> cfg = LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])
        >>> cfg.scaling
        2.0
    """

    method: Literal["lora"] = "lora"
    """Adapter method name."""

    rank: int = Field(8, gt=0)
    """Rank r of the update B @ A."""

    alpha: float = Field(16.0, gt=0)
    """Scale numerator: the update is multiplied by alpha / r (alpha / sqrt(r) with rsLoRA)."""

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch input."""

    target_modules: list[str] | str | None = None
    """Modules to wrap: a list of names (exact or suffix), a regex string (full match),
    ``"all-linear"``, or None for the architecture's default (PEFT's)."""

    exclude_modules: list[str] | str | None = None
    """Modules never to wrap (same syntax as target_modules)."""

    bias: Literal["none", "all", "lora_only"] = "none"
    """Which base biases also train: none, all, or those of wrapped layers."""

    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski, 2023)."""

    use_dora: bool = False
    """Weight-decomposed LoRA (Liu et al., 2024): learn a per-row magnitude too."""

    init: Literal["default", "gaussian", "random"] = "default"
    """A kaiming-uniform and B zero (default), A gaussian and B zero, or both random
    (not identity at init; for tests)."""

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


_PEFT_INIT = {"default": True, "gaussian": "gaussian", "random": False}
# PEFT fields tunekit does not implement: loading a config that sets them would
# silently train or run something else, so it is refused.
_PEFT_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None,
    "layer_replication": None, "use_qalora": False, "lora_bias": False, "target_parameters": None,
    "trainable_token_indices": None, "alora_invocation_tokens": None,
}


def lora_to_peft(cfg: LoRAConfig, target_modules: list[str] | str, fan_in_fan_out: bool) -> dict[str, Any]:
    """PEFT ``LoraConfig`` fields for ``cfg`` (target_modules as resolved for the model)."""
    return {
        "peft_type": "LORA",
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules,
        "exclude_modules": cfg.exclude_modules,
        "bias": cfg.bias,
        "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora,
        "init_lora_weights": _PEFT_INIT[cfg.init],
        "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": cfg.modules_to_save or None,
        "inference_mode": True,
    }


def lora_from_peft(saved: dict[str, Any]) -> LoRAConfig:
    """A ``LoRAConfig`` from PEFT's ``adapter_config.json`` fields; refuses features tunekit lacks."""
    for key, default in _PEFT_UNSUPPORTED_DEFAULTS.items():
        value = saved.get(key, default)
        if value not in (default, None, {}, [], False):
            raise ValueError(f"PEFT LoRA option {key}={value!r} is not supported by tunekit; re-save without it")
    init = saved.get("init_lora_weights", True)
    init_name = {True: "default", "gaussian": "gaussian", False: "random"}.get(init, "default")
    targets = saved.get("target_modules")
    return LoRAConfig(
        rank=saved["r"],
        alpha=saved.get("lora_alpha", 8),
        dropout=saved.get("lora_dropout", 0.0),
        target_modules=sorted(targets) if isinstance(targets, (list, set, tuple)) else targets,
        exclude_modules=saved.get("exclude_modules"),
        bias=saved.get("bias", "none"),
        use_rslora=saved.get("use_rslora", False),
        use_dora=saved.get("use_dora", False),
        init=init_name,
        modules_to_save=saved.get("modules_to_save") or [],
    )
