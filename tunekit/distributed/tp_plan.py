"""Tensor-parallel plans: which module is split how, from the one architecture table.

The ``tp`` column of ``tunekit.adapters.hf.arch`` names, per architecture, either
transformers' own ``base_model_tp_plan`` (read from the model's config class, e.g.
``LlamaConfig.base_model_tp_plan``) or tunekit's plan (GPT-2, BERT/RoBERTa, T5).
This module turns it into concrete module paths of an (adapter-injected) model,
and answers the questions asked before any process starts: does the TP degree
divide the heads, the KV heads and the MLP width; can this adapter method run.

The output head and the embeddings stay whole (replicated): the head's loss then
needs no collective (the fused linear + cross-entropy runs unchanged on every
rank) at the price of one full copy of the (frozen) head per rank, and the
vocabulary needs no divisibility.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from tunekit.adapters.hf.arch import ARCHS, TPPlan, supporting

STYLES = ("colwise", "rowwise", "packed_colwise", "embedding_colwise", "replicate")
"""The split styles tunekit applies (see ``TPPlan``)."""

_FROM_TRANSFORMERS = {"colwise": "colwise", "rowwise": "rowwise", "replicated_with_grad_allreduce": "replicate"}
"""transformers' style names in the plans tunekit reads, and tunekit's for them."""

METHODS = ("lora", "prefix", "bottleneck", "prompt")
"""Adapter methods that run under tensor parallelism."""


@dataclass(frozen=True)
class TPLayer:
    """One module of the model the plan splits."""

    path: str
    """The module the plan names (``model.layers.0.self_attn.q_proj``); may be an adapter wrapper."""
    style: str
    parts: int = 1
    """Outputs packed side by side (``packed_colwise:3``: q, k, v), each split on its own."""


def _model_type(model_or_config: Any) -> str | None:
    config = getattr(model_or_config, "config", model_or_config)
    return getattr(config, "model_type", None)


def arch_plan(model_or_config: Any) -> TPPlan:
    """The table's ``tp`` entry for this model (or config).

    Raises:
        ValueError: the architecture has no tensor-parallel plan.
    """
    model_type = _model_type(model_or_config)
    spec = ARCHS.get(model_type)
    if spec is None or spec.tp is None:
        raise ValueError(f"tensor parallelism has no plan for model_type {model_type!r} (supported: "
                         f"{', '.join(supporting('tp'))}); use distributed.strategy fsdp")
    return spec.tp


def parse_style(style: str) -> tuple[str, int]:
    """``"packed_colwise:3"`` -> ("packed_colwise", 3); ``"colwise"`` -> ("colwise", 1)."""
    name, _, parts = style.partition(":")
    if name not in STYLES:
        raise ValueError(f"tensor-parallel style {style!r} is not one tunekit applies ({', '.join(STYLES)})")
    return name, int(parts or 1)


def layer_styles(model_or_config: Any) -> dict[str, str]:
    """Pattern (relative to the base model, ``*`` = one path component) -> tunekit style."""
    plan = arch_plan(model_or_config)
    if plan.layers is not None:
        return dict(plan.layers)
    config = getattr(model_or_config, "config", model_or_config)
    theirs = getattr(type(config), "base_model_tp_plan", None) or {}
    if not theirs:
        raise ValueError(f"{type(config).__name__} has no base_model_tp_plan; tensor parallelism cannot split it")
    styles = {}
    for pattern, style in theirs.items():
        if style not in _FROM_TRANSFORMERS:
            raise ValueError(f"{type(config).__name__}.base_model_tp_plan splits {pattern!r} as {style!r}, which "
                             f"tunekit does not apply (known: {', '.join(_FROM_TRANSFORMERS)})")
        styles[pattern] = _FROM_TRANSFORMERS[style]
    return styles


def glob_regex(pattern: str) -> str:
    """A plan pattern as a regex over module paths: ``layers.*.mlp`` -> ``layers\\.[^.]+\\.mlp``."""
    return r"\.".join("[^.]+" if part == "*" else re.escape(part) for part in pattern.split("."))


def base_prefix(model: nn.Module) -> str:
    """The path of ``model.base_model`` inside ``model`` plus a dot ("" when it is the model itself)."""
    base = getattr(model, "base_model", model)
    if base is model:
        return ""
    path = next((name for name, module in model.named_modules() if module is base), None)
    if path is None:
        raise ValueError(f"{type(model).__name__}.base_model is not one of its modules")
    return path + "."


def _matching(model: nn.Module, patterns: dict[str, Any]) -> list[tuple[str, Any]]:
    prefix = base_prefix(model)
    compiled = [(re.compile(re.escape(prefix) + glob_regex(p)), value) for p, value in patterns.items()]
    found = []
    for path, _ in model.named_modules():
        value = next((v for regex, v in compiled if regex.fullmatch(path)), None)
        if value is not None:
            found.append((path, value))
    return found


def resolve_layers(model: nn.Module) -> list[TPLayer]:
    """Every module of ``model`` the plan splits, in model order.

    Raises:
        ValueError: no module matches (a plan that does not fit this model's layout).
    """
    layers = [TPLayer(path, *parse_style(style)) for path, style in _matching(model, layer_styles(model))]
    if not any(layer.style != "replicate" for layer in layers):
        raise ValueError(f"the tensor-parallel plan of {model.config.model_type!r} matched no module of "
                         f"{type(model).__name__}; its layout differs from the one the plan describes")
    return layers


def local_width_modules(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """(module path, attributes holding a per-rank width) for the modules whose code needs them."""
    return _matching(model, dict(arch_plan(model).local_widths))


def placement_patterns(model: nn.Module) -> dict[str, str]:
    """Full-path regex -> style, as ``tunekit.estimate``'s per-rank accounting reads it."""
    prefix = re.escape(base_prefix(model))
    return {prefix + glob_regex(p): style for p, style in layer_styles(model).items()}


def size_problem(config: Any, tp: int) -> str | None:
    """Why ``tp`` cannot split this model (heads, KV heads, MLP width), or None.

    Example:
        >>> from transformers import LlamaConfig
        >>> size_problem(LlamaConfig(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=64), 2)
        'distributed.tp_size=2 does not divide num_key_value_heads=3 of this llama model; pick a divisor of 3'
    """
    try:
        plan = arch_plan(config)
        layer_styles(config)
    except ValueError as err:
        return str(err)
    for field_name in plan.sizes:
        value = getattr(config, field_name, None)
        if isinstance(value, int) and value % tp:
            return (f"distributed.tp_size={tp} does not divide {field_name}={value} of this {config.model_type} "
                    f"model; pick a divisor of {value}")
    if config.model_type == "gpt2" and getattr(config, "add_cross_attention", False):
        return "tensor parallelism does not split GPT-2's cross-attention (add_cross_attention); use fsdp"
    return None


def method_problem(method: str, quantization: str | None, sequence_parallel: bool) -> str | None:
    """Why adapter ``method`` on a ``quantization`` base cannot run under tensor parallelism, or None."""
    if quantization:
        return (f"model.quantization={quantization!r} cannot run under tensor parallelism: bitsandbytes keeps "
                "each weight's quantization state (absmax per 64-value block of the flattened weight) beside "
                "the packed tensor, where DTensor cannot split it; use strategy fsdp (QLoRA shards there)")
    if method not in METHODS:
        return (f"adapter.method={method!r} cannot run under tensor parallelism (supported: {', '.join(METHODS)}); "
                "use strategy fsdp")
    if sequence_parallel and method != "lora":
        return (f"distributed.sequence_parallel supports adapter.method=lora only ({method} adapters would see "
                "sequence shards); set sequence_parallel: false")
    return None


def seq_len_problem(seq_len: int | None, tp: int, sequence_parallel: bool, config: Any = None) -> str | None:
    """Under sequence parallelism the sequence is split over the TP ranks: ``seq_len`` must divide, and the
    architecture (``config``, when given) needs a sequence-parallel plan."""
    if sequence_parallel and config is not None and not arch_plan(config).sequence_norms:
        return (f"distributed.sequence_parallel has no plan for model_type {config.model_type!r} (supported: "
                f"{', '.join(t for t, spec in ARCHS.items() if spec.tp and spec.tp.sequence_norms)}); set it to false")
    if sequence_parallel and seq_len is not None and seq_len % tp:
        return (f"distributed.sequence_parallel splits each sequence over tp_size={tp} ranks but "
                f"data.max_seq_len={seq_len} is not a multiple of {tp}; use a multiple of {tp}")
    return None
