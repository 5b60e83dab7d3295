"""tunekit.estimate: will a fine-tuning run fit, and how should it be spread over the GPUs?

The model is built on the meta device from its ``config.json`` (no weights), the
adapter injected, every parameter counted by its real storage; a training step
of a 2- and 3-block replica is simulated on fake tensors at the target shape to
measure activations and temporaries; the model states of every strategy follow
the ZeRO paper's accounting (``tunekit.estimate.memory``).

Example:
    >>> from transformers import LlamaConfig
    >>> from tunekit.adapters import LoRAConfig
    >>> from tunekit.estimate import Devices, ModelSpec, RunSettings, StepShape, plan
    >>> config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
    ...                      num_attention_heads=4, num_key_value_heads=2)
    >>> spec = ModelSpec(config, task="causal_lm", dtype="bf16", adapter=LoRAConfig(rank=4))
    >>> result = plan(spec, RunSettings(StepShape(batch=2, seq_len=64, mixed_precision="bf16")),
    ...               Devices(count=1, memory=2**30))
    >>> result.recommended.layout.strategy, result.model["trainable"]  # 4 layers x r4 x ((64+64) + (64+32))
    ('none', 3584)
"""

from importlib import import_module

_LAZY = {
    "ActivationProfile": "tunekit.estimate.activations",
    "StepShape": "tunekit.estimate.activations",
    "profile_activations": "tunekit.estimate.activations",
    "Choices": "tunekit.estimate.inputs",
    "from_choices": "tunekit.estimate.inputs",
    "from_finetune_config": "tunekit.estimate.inputs",
    "Measurement": "tunekit.estimate.measure",
    "measure_training_step": "tunekit.estimate.measure",
    "RankBytes": "tunekit.estimate.memory",
    "deepspeed_zero3_model_states": "tunekit.estimate.memory",
    "rank_model_states": "tunekit.estimate.memory",
    "zero_model_states": "tunekit.estimate.memory",
    "Inventory": "tunekit.estimate.model",
    "ModelSpec": "tunekit.estimate.model",
    "build_model": "tunekit.estimate.model",
    "inventory": "tunekit.estimate.model",
    "Breakdown": "tunekit.estimate.planner",
    "Devices": "tunekit.estimate.planner",
    "Layout": "tunekit.estimate.planner",
    "Plan": "tunekit.estimate.planner",
    "Recommendation": "tunekit.estimate.planner",
    "RunSettings": "tunekit.estimate.planner",
    "plan": "tunekit.estimate.planner",
    "recommend": "tunekit.estimate.planner",
    "format_plan": "tunekit.estimate.report",
    "plan_json": "tunekit.estimate.report",
    "plot_plan": "tunekit.estimate.report",
    "load_model_config": "tunekit.estimate.sources",
    "parse_bytes": "tunekit.estimate.units",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunekit.estimate' has no attribute {name!r}")
