"""Wrap-and-replace injection: find target modules by name, swap in wrappers.

Target semantics follow PEFT: a string is a regular expression matched
against the full module name (``re.fullmatch``); a list matches a module
whose name equals an entry or ends with ``"." + entry``. ``"all-linear"``
selects every linear layer except the output head.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from tunekit.adapters.host import AdapterHost


@dataclass
class InjectionReport:
    """What ``inject_adapters`` did. ``wrapped`` lists module names."""

    name: str
    method: str
    wrapped: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0

    def __str__(self) -> str:
        share = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (
            f"{self.method} adapter {self.name!r}: wrapped {len(self.wrapped)} modules; "
            f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} "
            f"|| trainable%: {share:.4f}"
        )


def _matches(module_name: str, targets: str | Sequence[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)


def _is_inside_host(model: nn.Module, module_name: str) -> bool:
    """True for modules that live inside an adapter host (wrapped bases, adapter weights)."""
    parts = module_name.split(".")
    module = model
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, AdapterHost):
            return True
    return False


def find_targets(
    model: nn.Module,
    targets: str | Sequence[str],
    exclude: str | Sequence[str] | None = None,
) -> list[tuple[str, nn.Module]]:
    """Modules of ``model`` whose names match ``targets`` (and not ``exclude``).

    An already-wrapped module is returned as its wrapper (so a second named
    adapter joins the same host), never as the base inside it.
    """
    found = []
    for name, module in model.named_modules():
        if not name or not _matches(name, targets):
            continue
        if exclude and _matches(name, exclude):
            continue
        if _is_inside_host(model, name):
            continue
        found.append((name, module))
    return found


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def wrap_targets(
    model: nn.Module,
    targets: list[tuple[str, nn.Module]],
    adapter_name: str,
    wrapper_cls: type,
    make_adapter: Callable[[nn.Module], nn.Module],
) -> list[str]:
    """Wrap each target in ``wrapper_cls`` (reusing an existing wrapper) and add one adapter.

    ``make_adapter(base_layer)`` builds the adapter module for that layer.
    """
    # Checked before anything is wrapped, so a refusal leaves the model untouched.
    for name, module in targets:
        if isinstance(module, AdapterHost) and not isinstance(module, wrapper_cls):
            raise ValueError(
                f"module {name!r} already holds a {type(module).__name__} adapter; a {wrapper_cls.__name__} "
                "cannot share it (inject this adapter first, or target other modules)"
            )
    wrapped = []
    for name, module in targets:
        if isinstance(module, wrapper_cls):
            host = module
        else:
            host = wrapper_cls(module)
            host.train(module.training)  # follow the model's train/eval mode
            replace_module(model, name, host)
        host.add_adapter(adapter_name, make_adapter(host.base_layer))
        wrapped.append(name)
    return wrapped
