"""The adapter-method registry: one entry per method, picked by ``config.method``.

A method says how to inject itself and how its state maps to a saved folder.
Methods that PEFT also has write PEFT's format; the others write tunekit's
own (same file names, ``"tunekit_method"`` in the JSON instead of
``"peft_type"``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from tunekit.adapters.config import AdapterConfig
from tunekit.adapters.host import AdapterHost


def iter_hosts(model: nn.Module) -> Iterator[tuple[str, AdapterHost]]:
    """(module path, host) for every adapter host in ``model``."""
    for path, module in model.named_modules():
        if isinstance(module, AdapterHost):
            yield path, module


def host_state(model: nn.Module, name: str, host_types: tuple[type, ...]) -> dict[str, torch.Tensor]:
    """State of adapter ``name`` in hosts of ``host_types``, keyed ``<module path>.<local key>``."""
    state = {}
    for path, host in iter_hosts(model):
        if isinstance(host, host_types) and name in host.adapters:
            for key, value in host.adapter_state(name).items():
                state[f"{path}.{key}" if path else key] = value
    return state


def load_host_state(
    model: nn.Module, name: str, host_types: tuple[type, ...], state: dict[str, torch.Tensor]
) -> None:
    """Inverse of ``host_state``: every expected key must be present, none extra."""
    remaining = dict(state)
    for path, host in iter_hosts(model):
        if not (isinstance(host, host_types) and name in host.adapters):
            continue
        prefix = f"{path}." if path else ""
        local = {k: remaining.pop(prefix + k, None) for k in host.adapter_state(name)}
        missing = [prefix + k for k, v in local.items() if v is None]
        if missing:
            raise KeyError(f"saved adapter {name!r} lacks {len(missing)} tensors, e.g. {missing[0]!r}")
        host.load_adapter_state(name, local)
    if remaining:
        raise KeyError(
            f"saved adapter {name!r} has {len(remaining)} tensors this model has no place for, "
            f"e.g. {next(iter(remaining))!r} (was it saved from another architecture or config?)"
        )


class AdapterMethod:
    """How one adapter method is injected and serialised. Subclass per method."""

    name: str
    config_cls: type[AdapterConfig]
    peft_type: str | None = None

    def inject(self, model: nn.Module, cfg: AdapterConfig, adapter_name: str) -> list[str]:
        """Insert adapter ``adapter_name`` into ``model`` in place; return what was wrapped."""
        raise NotImplementedError

    def trainable_extras(self, model: nn.Module, cfg: AdapterConfig) -> Iterator[nn.Parameter]:
        """Base-model parameters this method trains too (e.g. LoRA ``bias="all"``)."""
        return iter(())

    def export_config(self, model: nn.Module, cfg: AdapterConfig) -> dict:
        return {"tunekit_method": self.name, **cfg.model_dump()}

    def import_config(self, saved: dict) -> AdapterConfig:
        fields = {k: v for k, v in saved.items() if k != "tunekit_method"}
        return self.config_cls(**fields)

    def export_state(self, model: nn.Module, adapter_name: str, cfg: AdapterConfig) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def import_state(
        self, model: nn.Module, adapter_name: str, cfg: AdapterConfig, state: dict[str, torch.Tensor]
    ) -> None:
        raise NotImplementedError


METHODS: dict[str, AdapterMethod] = {}
PEFT_TYPES: dict[str, AdapterMethod] = {}


def register_method(method: AdapterMethod) -> AdapterMethod:
    METHODS[method.name] = method
    if method.peft_type:
        PEFT_TYPES[method.peft_type] = method
    return method


def method_for(cfg: AdapterConfig) -> AdapterMethod:
    try:
        return METHODS[cfg.method]
    except KeyError:
        raise ValueError(f"unknown adapter method {cfg.method!r}; known: {sorted(METHODS)}") from None
