"""LoRA as a registered adapter method: target resolution, injection, PEFT-format state."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from tunekit.adapters.hf.arch import arch_spec
from tunekit.adapters.hf.layers import SUPPORTED_LINEAR_TYPES, is_linear_like
from tunekit.adapters.hf.peft_format import PEFT_PREFIX, peft_task_type, strip_peft_prefix
from tunekit.adapters.host import AdapterHost, ModulesToSave
from tunekit.adapters.injection import find_targets, wrap_targets
from tunekit.adapters.lora.config import LoRAConfig, lora_from_peft, lora_to_peft
from tunekit.adapters.lora.layer import LoRABranch, LoRALayer
from tunekit.adapters.registry import AdapterMethod, host_state, iter_hosts, load_host_state


def resolve_targets(model: nn.Module, cfg: LoRAConfig) -> list[str] | str:
    """``cfg.target_modules`` made concrete: the arch default when None; "all-linear" kept."""
    if cfg.target_modules is None:
        return list(arch_spec(model).lora_targets)
    return cfg.target_modules


def _all_linear_names(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    # Like PEFT: every linear layer except the output head (and modules trained in full).
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = []
    for name, module in model.named_modules():
        if module is head or any(name == m or name.endswith("." + m) for m in cfg.modules_to_save):
            continue
        if is_linear_like(module) or isinstance(module, LoRALayer):
            names.append(name)
    return names


class LoRAMethod(AdapterMethod):
    name = "lora"
    config_cls = LoRAConfig
    peft_type = "LORA"

    def inject(self, model: nn.Module, cfg: LoRAConfig, adapter_name: str) -> list[str]:
        targets = resolve_targets(model, cfg)
        if targets == "all-linear":
            targets = _all_linear_names(model, cfg)
        found = find_targets(model, targets, cfg.exclude_modules) if targets else []
        if not found:
            linear = [n for n, m in model.named_modules() if is_linear_like(m)][:6]
            raise ValueError(
                f"LoRA target_modules={cfg.target_modules!r} matched no module of {type(model).__name__}; "
                f"linear layers here are named like {linear}"
            )
        for name, module in found:
            if not (is_linear_like(module) or isinstance(module, (LoRALayer, AdapterHost))):
                raise ValueError(
                    f"LoRA cannot wrap {name!r} ({type(module).__name__}); supported: {SUPPORTED_LINEAR_TYPES}. "
                    "Narrow target_modules to linear layers"
                )
        return wrap_targets(model, found, adapter_name, LoRALayer, lambda base: LoRABranch(base, cfg))

    def trainable_extras(self, model: nn.Module, cfg: LoRAConfig) -> Iterator[nn.Parameter]:
        for name, p in self._bias_params(model, cfg).items():
            yield p

    def _bias_params(self, model: nn.Module, cfg: LoRAConfig) -> dict[str, nn.Parameter]:
        """Base biases that train too, by module: ``lora_only``: the wrapped layers' own;
        ``all``: every module's, except adapters (they train as adapters) and the frozen
        original inside a ``ModulesToSave`` (its trained copy holds the bias that counts).
        Keys as ``named_parameters()`` spells them (PEFT's saved keys, after its prefix)."""
        if cfg.bias == "none":
            return {}
        if cfg.bias == "lora_only":
            owners = [(f"{path}.base_layer", host.base_layer) for path, host in iter_hosts(model)
                      if isinstance(host, LoRALayer)]
        else:
            skip = set()
            for _, host in iter_hosts(model):
                skip.update(map(id, host.adapters.modules()))
                if isinstance(host, ModulesToSave):
                    skip.update(map(id, host.base_layer.modules()))
            owners = [(path, m) for path, m in model.named_modules() if id(m) not in skip]
        return {f"{path}.bias" if path else "bias": m.bias for path, m in owners
                if isinstance(m._parameters.get("bias"), nn.Parameter)}

    def export_config(self, model: nn.Module, cfg: LoRAConfig) -> dict:
        fan_in_fan_out = any(
            type(m.base_layer).__name__ == "Conv1D" for m in model.modules() if isinstance(m, LoRALayer)
        )
        saved = lora_to_peft(cfg, resolve_targets(model, cfg), fan_in_fan_out)
        saved["task_type"] = peft_task_type(model)
        saved["base_model_name_or_path"] = getattr(getattr(model, "config", None), "_name_or_path", None) or None
        return saved

    def import_config(self, saved: dict) -> LoRAConfig:
        return lora_from_peft(saved)

    def export_state(self, model: nn.Module, adapter_name: str, cfg: LoRAConfig) -> dict[str, torch.Tensor]:
        state = host_state(model, adapter_name, (LoRALayer, ModulesToSave))
        state.update({k: p.detach() for k, p in self._bias_params(model, cfg).items()})
        return {PEFT_PREFIX + k: v for k, v in state.items()}

    def import_state(self, model: nn.Module, adapter_name: str, cfg: LoRAConfig, state: dict) -> None:
        state = strip_peft_prefix(state)
        for path, host in iter_hosts(model):
            if isinstance(host, ModulesToSave):
                # PEFT's bias="all" also saves the frozen original's bias and a second copy of the
                # trained one (<path>.original_module.bias, <path>.modules_to_save.bias); <path>.bias counts.
                for key in [k for k in state if k.startswith((f"{path}.original_module.", f"{path}.modules_to_save."))]:
                    del state[key]
        biases = self._bias_params(model, cfg)
        with torch.no_grad():
            for key in [k for k in state if k in biases]:
                biases[key].copy_(state.pop(key))
        load_host_state(model, adapter_name, (LoRALayer, ModulesToSave), state)
