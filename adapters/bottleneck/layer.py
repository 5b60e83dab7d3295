"""Bottleneck adapters: a small ``down -> act -> up`` MLP added to a sublayer's output.

    f(z) = s · dropout(up(act(down(LN(z)))))        down: d_in -> m, up: m -> d_out, m << d

Serial (Houlsby et al., 2019; Pfeiffer et al., 2021): wraps the module that produces the
sublayer's output (its output projection) and transforms that output, inside the residual:

    x ──► base_layer ──► h ──────────────────────────────► (+) ──► h + f(h)
                         └──► LN ─► down ─► act ─► up ─► ·s ─┘

Parallel (He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning"):
wraps the whole sublayer and is fed the sublayer's INPUT:

    x ──► base_layer (attention / MLP) ──────────────────► (+) ──► sublayer(x) + f(x)
     └──► LN ─► down ─► act ─► up ─► ·s ─────────────────┘

Post-norm blocks (BERT, RoBERTa) close each sublayer with ``LN(dense(h) + x)`` inside one
module; the parallel adapter wraps that module and adds ``f(x)`` to its residual input, giving
``LN(dense(h) + f(x) + x)``: He et al.'s placement, without copying the HF forward.

Several named adapters can sit in one wrapper: serial ones are applied in turn (each sees the
previous one's output), parallel ones are summed (each sees the sublayer input).
"""

from __future__ import annotations


import torch
from torch import nn

from tunekit.adapters.bottleneck.config import BottleneckConfig
from tunekit.adapters.hf.layers import base_weight, is_linear_like, is_quantized, write_linear
from tunekit.adapters.host import AdapterLayer

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "identity": nn.Identity,
}


class BottleneckBranch(nn.Module):
    """One named bottleneck adapter: ``adapter_down``, ``adapter_up`` (+ norm, + learned scale).

    Args:
        in_features: width d_in of the adapter input z.
        out_features: width d_out of what the adapter adds to.
        cfg: the adapter's config (size, activation, init, norm, scaling, dropout).
        device / dtype: where and in which dtype the parameters live.
    """

    def __init__(
        self, in_features: int, out_features: int, cfg: BottleneckConfig,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        size = cfg.bottleneck_size(out_features)
        self.adapter_norm = nn.LayerNorm(in_features, device=device, dtype=dtype) if cfg.layer_norm else nn.Identity()
        self.adapter_down = nn.Linear(in_features, size, device=device, dtype=dtype)
        self.act = _ACTIVATIONS[cfg.activation]()
        self.adapter_up = nn.Linear(size, out_features, device=device, dtype=dtype)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.linear = cfg.linear
        self.scaling = None if cfg.scaling == "learned" else float(cfg.scaling)
        if self.scaling is None:
            self.adapter_scale = nn.Parameter(torch.ones((), device=device, dtype=dtype))
        if cfg.init == "near_identity":
            self._init_near_identity()

    @torch.no_grad()
    def _init_near_identity(self) -> None:
        # Houlsby et al. §2.1: small down weights and a zero up projection make f(z) = 0 at init,
        # so training starts from the pretrained function.
        nn.init.trunc_normal_(self.adapter_down.weight, std=1e-2, a=-2e-2, b=2e-2)
        nn.init.zeros_(self.adapter_down.bias)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    @property
    def scale(self) -> torch.Tensor | float:
        """The factor s: the fixed float, or the learned scalar parameter."""
        return self.adapter_scale if self.scaling is None else self.scaling

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z: (..., d_in)`` -> ``f(z): (..., d_out)``, in the adapter's dtype."""
        z = z.to(self.adapter_down.weight.dtype)
        return self.dropout(self.adapter_up(self.act(self.adapter_down(self.adapter_norm(z))))) * self.scale

    @torch.no_grad()
    def delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For a linear branch, ``f(z) = ΔW z + Δb``: returns fp32 ``ΔW: (d_out, d_in)``, ``Δb: (d_out,)``."""
        s = float(self.scale)
        up, down = self.adapter_up, self.adapter_down
        delta_w = s * (up.weight.float() @ down.weight.float())
        delta_b = s * (up.weight.float() @ down.bias.float() + up.bias.float())
        return delta_w, delta_b


def _split(out):
    """HF sublayers return a tensor or a tuple whose first item is the hidden states."""
    return (out[0], out[1:]) if isinstance(out, tuple) else (out, None)


def _join(h: torch.Tensor, rest):
    return h if rest is None else (h, *rest)


class SerialBottleneck(AdapterLayer):
    """Serial adapters after ``base_layer``'s output: ``h = base(x); h + f(h)``."""

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        names = self.unmerged_active()
        if not names:
            return out
        h, rest = _split(out)
        for name in names:
            h = h + self.adapters[name](h).to(h.dtype)
        return _join(h, rest)

    def cannot_merge_reason(self, names: list[str]) -> str | None:
        if not names:
            return None
        return (
            f"serial bottleneck adapters {names} cannot be merged: they transform the sublayer's output "
            f"(h + s·up(act(down(h)))), which no weight of {type(self.base_layer).__name__} can absorb. "
            "Keep the adapters unmerged, or drop them with eject_adapters(model, merge=False)"
        )


class ParallelBottleneck(AdapterLayer):
    """Parallel adapters beside ``base_layer``, fed its input: ``base(x) + Σ f(x)``.

    Beside a linear-like base (``nn.Linear``, ``Conv1D``) with a bias, a linear adapter
    (identity activation, no norm, no dropout) merges exactly: ``W' = W + s·U·D``,
    ``b' = b + s·(U·b_D + b_U)``, computed in fp32.
    """

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        names = self.unmerged_active()
        if not names:
            return out
        x = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"parallel bottleneck around {type(self.base_layer).__name__} needs the sublayer input as the "
                f"first positional argument or hidden_states=...; got keyword arguments {sorted(kwargs)}"
            )
        h, rest = _split(out)
        for name in names:
            h = h + self.adapters[name](x).to(h.dtype)
        return _join(h, rest)

    # -- merging -----------------------------------------------------------
    def cannot_merge_reason(self, names: list[str]) -> str | None:
        if not names:
            return None
        base = self.base_layer
        if is_quantized(base):
            return f"parallel bottleneck adapters {names}: cannot merge into a quantized (bitsandbytes) base in place"
        if not is_linear_like(base):
            return (
                f"parallel bottleneck adapters {names} sit beside a whole sublayer ({type(base).__name__}), "
                "which is not one weight, so they cannot be folded into it (put the adapter beside a linear "
                "layer with target_modules to get a mergeable one)"
            )
        nonlinear = [n for n in names if not self.adapters[n].linear]
        if nonlinear:
            return (
                f"parallel bottleneck adapters {nonlinear} are not linear maps: merging needs "
                "activation='identity', layer_norm=False and dropout=0"
            )
        if base.bias is None:
            return f"parallel bottleneck adapters {names}: the base {type(base).__name__} has no bias to absorb the adapter biases"
        return None

    def _fold(self, name: str, safe: bool) -> None:
        delta_w, delta_b = self.adapters[name].delta()
        base = self.base_layer
        write_linear(base, base_weight(base).float() + delta_w, base.bias.float() + delta_b, safe)


class PostNormParallelBottleneck(ParallelBottleneck):
    """Parallel adapters for post-LN blocks: wraps ``out(h, x) = LN(dropout(dense(h)) + x)``.

    ``x`` (``input_tensor``) is the sublayer's input; the adapters' sum is added to it, so the
    result is ``LN(dropout(dense(h)) + x + Σ f(x))``.
    """

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor, *args, **kwargs):
        names = self.unmerged_active()
        residual = input_tensor
        for name in names:
            residual = residual + self.adapters[name](input_tensor).to(input_tensor.dtype)
        return self.base_layer(hidden_states, residual, *args, **kwargs)

    def cannot_merge_reason(self, names: list[str]) -> str | None:
        if not names:
            return None
        return (
            f"parallel bottleneck adapters {names} add into the residual before {type(self.base_layer).__name__}'s "
            "LayerNorm, as a function of the sublayer input: no weight can absorb them"
        )
