"""tunekit.adapters: PEFT methods that wrap Hugging Face modules in place.

Example:
    >>> import torch
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from tunekit.adapters import LoRAConfig, inject_adapters, trainable_parameters
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    >>> report = inject_adapters(model, LoRAConfig(rank=4))
    >>> report.wrapped[:2]
    ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj']
"""

from tunekit.adapters.api import (
    ParamCount,
    active_adapters,
    adapter_configs,
    delete_adapter,
    disable_adapters,
    eject_adapters,
    inject_adapters,
    mark_only_adapters_trainable,
    merge_adapters,
    set_active_adapters,
    trainable_parameters,
    unmerge_adapters,
)
from tunekit.adapters.bottleneck import BottleneckConfig, ParallelBottleneck, SerialBottleneck
from tunekit.adapters.config import AdapterConfig
from tunekit.adapters.host import AdapterHost, AdapterLayer, ModulesToSave, NotMergeableError
from tunekit.adapters.injection import InjectionReport
from tunekit.adapters.lora import LoRAConfig, LoRALayer
from tunekit.adapters.prefix import PrefixConfig, fold_prefix
from tunekit.adapters.prompt import PromptConfig
from tunekit.adapters.registry import METHODS, AdapterMethod, register_method
from tunekit.adapters.serialization import adapter_state_dict, load_adapters, read_adapter_config, save_adapters

__all__ = [
    "METHODS",
    "AdapterConfig",
    "AdapterHost",
    "AdapterLayer",
    "AdapterMethod",
    "BottleneckConfig",
    "InjectionReport",
    "LoRAConfig",
    "LoRALayer",
    "ModulesToSave",
    "NotMergeableError",
    "ParallelBottleneck",
    "ParamCount",
    "PrefixConfig",
    "PromptConfig",
    "SerialBottleneck",
    "active_adapters",
    "adapter_configs",
    "adapter_state_dict",
    "delete_adapter",
    "disable_adapters",
    "eject_adapters",
    "fold_prefix",
    "inject_adapters",
    "load_adapters",
    "mark_only_adapters_trainable",
    "merge_adapters",
    "read_adapter_config",
    "register_method",
    "save_adapters",
    "set_active_adapters",
    "trainable_parameters",
    "unmerge_adapters",
]
