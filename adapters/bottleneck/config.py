"""Bottleneck-adapter configuration (serial: Houlsby 2019 / Pfeiffer 2021; parallel: He et al. 2022).

Saved in tunekit's own format (PEFT has no bottleneck method):
``{"tunekit_method": "bottleneck", ...these fields}``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tunekit.adapters.config import AdapterConfig

Sublayer = Literal["attention", "mlp", "cross_attention"]

# Named placements: which sublayers of each block get an adapter.
PLACEMENTS: dict[str, list[str]] = {"houlsby": ["attention", "mlp"], "pfeiffer": ["mlp"]}
DEFAULT_REDUCTION_FACTOR = 16


class BottleneckConfig(AdapterConfig):
    """Bottleneck adapters: ``s · up(act(down(LN(z))))`` added serially after, or parallel to, a sublayer.

    Example:
        >>> cfg = BottleneckConfig(variant="parallel", placement="pfeiffer", hidden_size=8)
        >>> cfg.sublayers(), cfg.bottleneck_size(32)
        (['mlp'], 8)
        >>> BottleneckConfig().bottleneck_size(64)  # reduction_factor 16 by default
        4
    """

    method: Literal["bottleneck"] = "bottleneck"
    """Adapter method name."""

    variant: Literal["serial", "parallel"] = "serial"
    """``serial``: after the sublayer's output, inside the residual (``h + f(h)``);
    ``parallel``: beside the sublayer, fed its input (``sublayer(x) + f(x)``)."""

    placement: Literal["houlsby", "pfeiffer"] | list[Sublayer] | None = None
    """Which sublayers of every block get an adapter: ``houlsby`` (attention and MLP), ``pfeiffer``
    (MLP only), or a list of ``attention`` / ``mlp`` / ``cross_attention``. Default ``houlsby``;
    must stay unset when ``target_modules`` is given."""

    target_modules: list[str] | str | None = None
    """Wrap these modules instead of using the architecture table (PEFT semantics: list = exact or
    suffix names, str = regex). Needed for architectures not in the table, and to put a parallel
    adapter beside a single linear layer (the only case that can be merged)."""

    reduction_factor: int | None = Field(None, gt=0)
    """Bottleneck size = model width // reduction_factor (at least 1). Exclusive with hidden_size;
    16 when neither is set."""

    hidden_size: int | None = Field(None, gt=0)
    """Bottleneck size m, fixed. Exclusive with reduction_factor."""

    activation: Literal["relu", "gelu", "silu", "tanh", "identity"] = "relu"
    """Non-linearity between the down and the up projection."""

    init: Literal["near_identity", "random"] = "near_identity"
    """``near_identity``: down ~ N(0, 0.01²), up and biases zero, so the model is unchanged at init
    (Houlsby et al. §2.1); ``random``: PyTorch's default Linear init for both (for tests)."""

    layer_norm: bool = False
    """Apply a LayerNorm (with affine weight and bias) to the adapter input, before the down projection."""

    scaling: float | Literal["learned"] = 1.0
    """Factor s on the adapter output: a fixed float, or ``learned`` (a trainable scalar, init 1)."""

    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter output (before scaling)."""

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        # Defaults that depend on other fields are filled in before validation, so a saved
        # config states them explicitly and reloads unchanged.
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if data.get("reduction_factor") is None and data.get("hidden_size") is None:
            data["reduction_factor"] = DEFAULT_REDUCTION_FACTOR
        if data.get("placement") is None and data.get("target_modules") is None:
            data["placement"] = "houlsby"
        return data

    @model_validator(mode="after")
    def _check(self) -> BottleneckConfig:
        if self.reduction_factor is not None and self.hidden_size is not None:
            raise ValueError("set either reduction_factor or hidden_size, not both")
        if self.target_modules is not None and self.placement is not None:
            raise ValueError("set either placement (architecture table) or target_modules (explicit), not both")
        if isinstance(self.placement, list) and (not self.placement or len(set(self.placement)) < len(self.placement)):
            raise ValueError(f"placement list must be non-empty without repeats, got {self.placement}")
        return self

    def sublayers(self) -> list[str]:
        """The sublayer kinds named by ``placement`` ([] when target_modules is used)."""
        if self.placement is None:
            return []
        return list(PLACEMENTS[self.placement]) if isinstance(self.placement, str) else list(self.placement)

    def bottleneck_size(self, width: int) -> int:
        """Bottleneck size m for a sublayer of width ``width``."""
        if self.hidden_size is not None:
            return self.hidden_size
        return max(1, width // (self.reduction_factor or DEFAULT_REDUCTION_FACTOR))

    @property
    def linear(self) -> bool:
        """True when the adapter is a linear map (foldable into a linear base when parallel)."""
        return self.activation == "identity" and not self.layer_norm and self.dropout == 0.0
