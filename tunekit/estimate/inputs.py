"""From what a user has to what the planner takes: a finetune config, or command-line choices.

``from_finetune_config(cfg)`` reads the sections of a ``FinetuneConfig`` the way
``tunekit finetune`` uses them (model source, dtype, quantization, attention,
adapter; data lengths and packing; batch, precision, checkpointing, optimizer,
fused loss; distributed TP degree). ``from_choices`` builds the same from the
CLI's flags. Either returns a ``ModelSpec`` and ``RunSettings``; flags given on
the command line override what a YAML says (``merge_choices``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from tunekit.estimate.activations import StepShape
from tunekit.estimate.model import ModelSpec, default_task
from tunekit.estimate.planner import RunSettings
from tunekit.estimate.sources import build_config, load_model_config

__all__ = ["METHODS", "Choices", "adapter_for", "from_choices", "from_finetune_config", "merge_choices"]

METHODS = ("lora", "dora", "qlora", "prefix", "prompt", "bottleneck", "full")
# flash_attention_2 and tunekit's kernel keep what SDPA's flash path keeps (output + log-sum-exp),
# and neither runs on a CPU, so the simulation runs SDPA for them.
# "auto" (the default) is tunekit's varlen attention on packed rows, else the loaded one: sdpa-like memory.
_ATTN = {"eager": "eager", "sdpa": "sdpa", "flash": "sdpa", "tunekit": "sdpa", "auto": "sdpa", None: None}
_HEADS = {"bert": "classifier", "roberta": "classifier"}


@dataclass(frozen=True)
class Choices:
    """Command-line choices; None = not given (the YAML's value or the default applies)."""

    method: str | None = None
    rank: int | None = None
    target_modules: list[str] | str | None = None
    virtual_tokens: int | None = None
    seq_len: int | None = None
    batch: int | None = None
    grad_checkpointing: bool | None = None
    dtype: str | None = None
    optimizer: str | None = None
    attn: str | None = None
    task: str | None = None
    num_labels: int | None = None


def _targets(value: list[str] | str | None) -> list[str] | str | None:
    if isinstance(value, list) and len(value) == 1 and value[0] in ("all-linear",):
        return value[0]
    return value


def adapter_for(method: str, config: Any, task: str, rank: int = 8, target_modules: Any = None,
                virtual_tokens: int = 20) -> tuple[Any, Any]:
    """(adapter config or None for full fine-tuning, quantization config or None) of a ``--method``.

    Raises:
        ValueError: an unknown method.
    """
    from tunekit.adapters import BottleneckConfig, LoRAConfig, PrefixConfig, PromptConfig
    from tunekit.models.config import QuantizationConfig

    head = [_HEADS.get(config.model_type, "score")] if task == "seq_cls" else []
    targets = _targets(target_modules)
    if method in ("lora", "dora", "qlora"):
        adapter = LoRAConfig(rank=rank, alpha=2 * rank, target_modules=targets, use_dora=method == "dora",
                             modules_to_save=head)
        return adapter, QuantizationConfig() if method == "qlora" else None
    if method == "prefix":
        return PrefixConfig(num_virtual_tokens=virtual_tokens, modules_to_save=head), None
    if method == "prompt":
        return PromptConfig(num_virtual_tokens=virtual_tokens, modules_to_save=head), None
    if method == "bottleneck":
        return BottleneckConfig(target_modules=targets, placement=None if targets else "houlsby",
                                modules_to_save=head), None
    if method == "full":
        return None, None
    raise ValueError(f"--method {method!r} is not one of {', '.join(METHODS)}")


def _dtype(choice: str | None, config: Any) -> str:
    if choice and choice != "auto":
        return choice
    stored = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
    return {"torch.bfloat16": "bf16", "bfloat16": "bf16", "torch.float16": "fp16", "float16": "fp16"}.get(stored, "fp32")


def from_choices(source: str, choices: Choices) -> tuple[ModelSpec, RunSettings]:
    """The spec and settings of ``tunekit estimate MODEL --flags``."""
    loaded = load_model_config(source)
    config = loaded.config
    task = choices.task or default_task(config)
    adapter, quantization = adapter_for(choices.method or "lora", config, task, choices.rank or 8,
                                        choices.target_modules, choices.virtual_tokens or 20)
    dtype = _dtype(choices.dtype or "bf16", config)
    spec = ModelSpec(config, task, dtype, quantization, adapter, _ATTN[choices.attn], choices.num_labels or 2,
                     origin=loaded.origin)
    shape = StepShape(batch=choices.batch or 1, seq_len=choices.seq_len or 512,
                      target_len=min(choices.seq_len or 512, 128), mixed_precision=dtype if dtype != "fp32" else "no",
                      grad_checkpointing=bool(choices.grad_checkpointing))
    return spec, RunSettings(shape, choices.optimizer or "adamw")


def _finetune_model_config(model: Any) -> Any:
    if model.from_config and model.name_or_path is None:
        config = build_config(model.model_type, {}, f"model.model_type={model.model_type!r}")
        for field, value in model.config_overrides.items():
            setattr(config, field, value)  # as tunekit.load_model does
        return config, f"model_type {model.model_type} + config_overrides"
    loaded = load_model_config(model.name_or_path, model.config_overrides)
    return loaded.config, loaded.origin


def from_finetune_config(cfg: Any) -> tuple[ModelSpec, RunSettings, list[int] | None]:
    """(spec, settings, TP degrees the config fixes or None) of a validated ``FinetuneConfig``."""
    from tunekit.config import task_for

    config, origin = _finetune_model_config(cfg.model)
    task = task_for(cfg)
    labels = len(cfg.data.labels) if cfg.data.labels else 2
    spec = ModelSpec(config, task, _dtype(cfg.model.dtype, config), cfg.model.quantization, cfg.adapter,
                     _ATTN[cfg.model.attn_implementation], labels, cfg.model.kernels, origin)
    data, train = cfg.data, cfg.train
    packed = data.packing
    if packed is None:  # finetune's default: pack causal-LM rows unless virtual tokens would be shared
        packed = task == "causal_lm" and cfg.adapter.method not in ("prefix", "prompt")
    shape = StepShape(batch=train.batch_size, seq_len=data.max_seq_len,
                      target_len=data.max_target_len or data.max_seq_len, packed=packed,
                      mixed_precision=train.mixed_precision, grad_checkpointing=train.gradient_checkpointing,
                      fused_cross_entropy=train.fused_cross_entropy)
    settings = RunSettings(shape, train.optimizer, train.grad_accum_steps)
    strategy = cfg.distributed.strategy
    tp_sizes = [cfg.distributed.tp_size] if strategy in ("tp", "fsdp_tp") else None
    return spec, settings, tp_sizes


def merge_choices(spec: ModelSpec, settings: RunSettings, choices: Choices) -> tuple[ModelSpec, RunSettings]:
    """``spec`` and ``settings`` with every flag the user gave applied on top."""
    if choices.method is not None or choices.rank is not None or choices.target_modules is not None:
        adapter, quantization = adapter_for(choices.method or getattr(spec.adapter, "method", "lora"), spec.config,
                                            spec.task, choices.rank or getattr(spec.adapter, "rank", 8),
                                            choices.target_modules, choices.virtual_tokens or 20)
        # an explicit --method decides the quantization too (qlora: 4-bit; the others: none)
        spec = replace(spec, adapter=adapter, quantization=quantization if choices.method else spec.quantization)
    if choices.dtype is not None:
        spec = replace(spec, dtype=_dtype(choices.dtype, spec.config))
    if choices.attn is not None:
        spec = replace(spec, attn=_ATTN[choices.attn])
    if choices.num_labels is not None:
        spec = replace(spec, num_labels=choices.num_labels)
    shape = settings.shape
    updates = {"batch": choices.batch, "seq_len": choices.seq_len, "grad_checkpointing": choices.grad_checkpointing}
    shape = replace(shape, **{k: v for k, v in updates.items() if v is not None})
    if choices.dtype is not None:
        shape = replace(shape, mixed_precision=spec.dtype if spec.dtype != "fp32" else "no")
    return spec, replace(settings, shape=shape, optimizer=choices.optimizer or settings.optimizer)
