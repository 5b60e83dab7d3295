"""Bottleneck adapters as a registered method: placement from the architecture table, injection,
and tunekit's own saved format (``"tunekit_method": "bottleneck"``; PEFT has no such method).

Placement (``adapters/hf/arch.py``), for every block:

    variant   sublayer wrapped                        wrapper
    serial    attention_out / mlp_out (output proj)   SerialBottleneck
    parallel  attention / mlp (whole sublayer)        ParallelBottleneck
    parallel  parent of *_out, post-norm archs        PostNormParallelBottleneck

Cross-attention (T5, BERT/GPT-2 decoders) gets an adapter only when ``placement`` names
``cross_attention``: ``houlsby`` / ``pfeiffer`` adapt self-attention and the FFN, as
AdapterHub's default (``cross_adapter=False``) does.
"""

from __future__ import annotations

import torch
from torch import nn

from tunekit.adapters.bottleneck.config import BottleneckConfig
from tunekit.adapters.bottleneck.layer import (
    BottleneckBranch,
    ParallelBottleneck,
    PostNormParallelBottleneck,
    SerialBottleneck,
)
from tunekit.adapters.hf.arch import ArchSpec, arch_spec
from tunekit.adapters.hf.layers import adapter_dtype, is_linear_like, linear_features
from tunekit.adapters.host import ModulesToSave
from tunekit.adapters.injection import find_targets, wrap_targets
from tunekit.adapters.registry import AdapterMethod, host_state, load_host_state

HOST_TYPES = (SerialBottleneck, ParallelBottleneck, ModulesToSave)


def _sublayer_path(spec: ArchSpec, sublayer: str, variant: str) -> str | None:
    """The module (regex relative to a block) that ``variant`` wraps for ``sublayer``."""
    out_path = getattr(spec, f"{sublayer}_out")
    if variant == "serial":
        return out_path
    if spec.post_norm:
        return out_path.rpartition(".")[0] if out_path else None
    return getattr(spec, sublayer)


def resolve_targets(model: nn.Module, cfg: BottleneckConfig) -> tuple[list[tuple[str, nn.Module]], type]:
    """The modules to wrap and the wrapper class, from ``target_modules`` or the arch table."""
    if cfg.target_modules is not None:
        found = find_targets(model, cfg.target_modules)
        if not found:
            raise ValueError(
                f"bottleneck target_modules={cfg.target_modules!r} matched no module of {type(model).__name__}"
            )
        return found, SerialBottleneck if cfg.variant == "serial" else ParallelBottleneck
    spec = arch_spec(model)
    model_type = model.config.model_type
    found = []
    for sublayer in cfg.sublayers():
        path = _sublayer_path(spec, sublayer, cfg.variant)
        if path is None:
            raise ValueError(f"placement {sublayer!r}: {model_type} blocks have no such sublayer; remove it from placement")
        matched = find_targets(model, rf"{spec.blocks}\.{path}")
        if not matched:
            raise ValueError(
                f"placement {sublayer!r} matched no module of this {model_type} model (looked for "
                f"'<block>.{path}'; cross-attention exists only in decoders built with it)"
            )
        found += matched
    if cfg.variant == "serial":
        return found, SerialBottleneck
    return found, PostNormParallelBottleneck if spec.post_norm else ParallelBottleneck


def _features(model: nn.Module, base: nn.Module, variant: str) -> tuple[int, int]:
    """(d_in, d_out) of the adapter: the output width for serial, the base's in/out for parallel."""
    if is_linear_like(base):
        in_f, out_f = linear_features(base)
        return (out_f, out_f) if variant == "serial" else (in_f, out_f)
    width = getattr(getattr(model, "config", None), "hidden_size", None)
    if width is None:
        raise ValueError(
            f"cannot tell the width of {type(base).__name__} (not a linear layer, and the model has no "
            "config.hidden_size): target linear layers with target_modules"
        )
    return width, width


def _param_spec(base: nn.Module) -> tuple[torch.device | None, torch.dtype]:
    """Adapters live on the base's device, in ``adapter_dtype`` (fp32 beside a half-precision or quantized base)."""
    ref = next(iter(base.parameters()), None)
    return (ref.device if ref is not None else None), adapter_dtype(base)


class BottleneckMethod(AdapterMethod):
    name = "bottleneck"
    config_cls = BottleneckConfig

    def inject(self, model: nn.Module, cfg: BottleneckConfig, adapter_name: str) -> list[str]:
        found, wrapper_cls = resolve_targets(model, cfg)

        def make_adapter(base: nn.Module) -> BottleneckBranch:
            device, dtype = _param_spec(base)
            return BottleneckBranch(*_features(model, base, cfg.variant), cfg, device=device, dtype=dtype)

        return wrap_targets(model, found, adapter_name, wrapper_cls, make_adapter)

    def export_state(self, model: nn.Module, adapter_name: str, cfg: BottleneckConfig) -> dict[str, torch.Tensor]:
        return host_state(model, adapter_name, HOST_TYPES)

    def import_state(
        self, model: nn.Module, adapter_name: str, cfg: BottleneckConfig, state: dict[str, torch.Tensor]
    ) -> None:
        load_host_state(model, adapter_name, HOST_TYPES, state)

