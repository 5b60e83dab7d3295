"""Prefix tuning configuration, and its one mapping to PEFT's PREFIX_TUNING ``adapter_config.json``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tunekit.adapters.config import AdapterConfig


class PrefixConfig(AdapterConfig):
    """Prefix tuning (Li & Liang, 2021) / P-tuning v2 (Liu et al., 2022).

    The layer count, key/value heads and head size come from the model.

    Example:
        >>> PrefixConfig(num_virtual_tokens=10, prefix_projection=True).method
        'prefix'
    """

    method: Literal["prefix"] = "prefix"
    """Adapter method name."""

    num_virtual_tokens: int = Field(20, gt=0)
    """Number of key/value prefix positions P added in front of every attention layer."""

    prefix_projection: bool = False
    """Produce the prefix with a reparameterisation MLP (embedding -> Linear -> tanh -> Linear);
    fold it away after training with ``fold_prefix``."""

    encoder_hidden_size: int | None = Field(None, gt=0)
    """Hidden width of the reparameterisation MLP (None: the key/value width, as PEFT)."""

    init_weights: Literal["random", "zero"] = "random"
    """Random normal prefix, or zeros (PEFT's ``init_weights="zero"``)."""


def prefix_to_peft(cfg: PrefixConfig, geometry: Any, task_type: str | None) -> dict[str, Any]:
    """PEFT ``PrefixTuningConfig`` fields for ``cfg`` on a model of ``geometry``."""
    return {
        "peft_type": "PREFIX_TUNING",
        "task_type": task_type,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": geometry.kv_dim,
        "num_transformer_submodules": geometry.num_transformer_submodules,
        "num_attention_heads": geometry.kv_heads,
        "num_layers": geometry.num_layers,
        "encoder_hidden_size": cfg.encoder_hidden_size or geometry.kv_dim,
        "prefix_projection": cfg.prefix_projection,
        "init_weights": "zero" if cfg.init_weights == "zero" else None,
        "modules_to_save": cfg.modules_to_save or None,
        "inference_mode": True,
        "revision": None,
    }


def prefix_from_peft(saved: dict[str, Any]) -> PrefixConfig:
    """A ``PrefixConfig`` from PEFT's fields (the geometry fields are checked against the model on load)."""
    return PrefixConfig(
        num_virtual_tokens=saved["num_virtual_tokens"],
        prefix_projection=saved.get("prefix_projection", False),
        encoder_hidden_size=saved.get("encoder_hidden_size"),
        init_weights="zero" if saved.get("init_weights") == "zero" else "random",
        modules_to_save=list(dict.fromkeys(saved.get("modules_to_save") or [])),
    )
