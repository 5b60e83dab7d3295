"""Model-level adapter operations: inject, switch, disable, merge, eject, count.

The model is mutated in place and stays the Hugging Face model it was, so
every HF API (``generate``, ``save_pretrained``, ...) keeps working. tunekit
keeps two plain attributes on it: ``tunekit_adapter_configs`` (name ->
config) and ``tunekit_active_adapters``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import nn

from tunekit.adapters.config import AdapterConfig
from tunekit.adapters.hf.layers import keep_4bit_layout_trainable
from tunekit.adapters.hf.saving import exclude_adapters_from_save, untie_merged_head
from tunekit.adapters.host import AdapterHost, AdapterLayer, ModulesToSave, NotMergeableError
from tunekit.adapters.injection import InjectionReport, find_targets, replace_module, wrap_targets
from tunekit.adapters.registry import iter_hosts, method_for


def adapter_configs(model: nn.Module) -> dict[str, AdapterConfig]:
    """Name -> config of every adapter injected into ``model``."""
    if not hasattr(model, "tunekit_adapter_configs"):
        model.tunekit_adapter_configs = {}
    return model.tunekit_adapter_configs


def active_adapters(model: nn.Module) -> list[str]:
    return list(getattr(model, "tunekit_active_adapters", []))


def inject_adapters(
    model: nn.Module, config: AdapterConfig, name: str = "default", activate: bool = True
) -> InjectionReport:
    """Insert adapter ``name`` described by ``config`` into ``model`` in place.

    The base model is frozen; only the active adapters' parameters train.
    With ``activate`` (the default) the new adapter becomes the only active
    one; otherwise it is added inactive (switch with ``set_active_adapters``).

    Raises:
        ValueError: the name is taken, nothing matched, or a target type is unsupported.
    """
    configs = adapter_configs(model)
    if name in configs:
        raise ValueError(f"model already has an adapter named {name!r}; delete_adapter() it or pick another name")
    method = method_for(config)
    keep_4bit_layout_trainable(model)  # gradients must flow back through every 4-bit layer
    wrapped = method.inject(model, config, name)
    if config.modules_to_save:
        targets = find_targets(model, config.modules_to_save)
        if not targets:
            raise ValueError(f"modules_to_save={config.modules_to_save} matched no module of {type(model).__name__}")
        wrapped += wrap_targets(model, targets, name, ModulesToSave, lambda base: None)
    configs[name] = config
    if activate or not active_adapters(model):
        set_active_adapters(model, [name])
    else:
        set_active_adapters(model, active_adapters(model))
    exclude_adapters_from_save(model)
    # The new adapter's own parameters (what trains while it is active), also when added inactive.
    own = {id(p): p for _, host in iter_hosts(model) if name in host.adapters for p in host.adapter_params(name)}
    own.update((id(p), p) for p in method.trainable_extras(model, config))
    return InjectionReport(name, config.method, wrapped, sum(map(_numel, own.values())),
                           trainable_parameters(model).total)


def set_active_adapters(model: nn.Module, names: str | Sequence[str]) -> None:
    """Make ``names`` the active adapters (applied in forward, and trained)."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in adapter_configs(model)]
    if unknown:
        raise ValueError(f"no adapter named {unknown[0]!r}; this model has {sorted(adapter_configs(model))}")
    model.tunekit_active_adapters = names
    for _, host in iter_hosts(model):
        host.set_active(names)
    mark_only_adapters_trainable(model)


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze everything but the active adapters (and what their method trains too)."""
    for p in model.parameters():
        p.requires_grad_(False)
    active = active_adapters(model)
    for _, host in iter_hosts(model):
        for name in host.active:
            for p in host.adapter_params(name):
                p.requires_grad_(True)
    configs = adapter_configs(model)
    for name in active:
        for p in method_for(configs[name]).trainable_extras(model, configs[name]):
            p.requires_grad_(True)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; wrappers left empty give their base module back."""
    configs = adapter_configs(model)
    if name not in configs:
        raise ValueError(f"no adapter named {name!r}; this model has {sorted(configs)}")
    for path, host in list(iter_hosts(model)):
        if name not in host.adapters:
            continue
        if isinstance(host, AdapterLayer) and name in host.merged:
            host.unmerge()
        host.remove_adapter(name)
        if not host.adapters:
            _remove_host(model, path, host, merge=False)
    del configs[name]
    set_active_adapters(model, [n for n in active_adapters(model) if n != name])
    exclude_adapters_from_save(model)


def _remove_host(model: nn.Module, path: str, host: AdapterHost, merge: bool) -> None:
    if isinstance(host, AdapterLayer):
        replace_module(model, path, host.eject(merge))
    else:
        host.eject(model, merge)  # model-level hosts (prefix, prompt) detach themselves


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model: every adapter off (merged ones are unmerged, then re-merged)."""
    hosts = [host for _, host in iter_hosts(model)]
    remerge = [(h, list(h.merged)) for h in hosts if isinstance(h, AdapterLayer) and h.merged]
    for host, _ in remerge:
        host.unmerge()
    for host in hosts:
        host.disabled = True
    try:
        yield model
    finally:
        for host in hosts:
            host.disabled = False
        for host, names in remerge:
            host.merge(names)


def _layers(model: nn.Module) -> list[AdapterLayer]:
    return [h for _, h in iter_hosts(model) if isinstance(h, AdapterLayer)]


def merge_adapters(model: nn.Module, names: Sequence[str] | None = None, safe: bool = True) -> None:
    """Fold the active (or given) adapters into the base weights, in place.

    The merged weight is computed in fp32 and rounded once to the weights' dtype; the
    original weights are kept (one extra copy of each merged weight) so that
    ``unmerge_adapters`` restores them bit-exactly, and a tied output head gets a
    merged weight of its own while the input embeddings stay unchanged. Idempotent:
    merging twice changes nothing. Refuses, before touching any weight, if some
    adapter cannot be merged (serial bottleneck, quantized base).
    """
    names = list(names) if names is not None else active_adapters(model)
    if any(not isinstance(h, AdapterLayer) and set(names) & set(h.adapters) for _, h in iter_hosts(model)):
        raise NotMergeableError("prefix and prompt adapters act on the inputs, not on weights: they cannot be merged")
    for layer in _layers(model):
        reason = layer.cannot_merge_reason([n for n in names if n in layer.adapters])
        if reason:
            raise NotMergeableError(reason)
    for layer in _layers(model):
        layer.merge([n for n in names if n in layer.adapters], safe=safe)


def unmerge_adapters(model: nn.Module) -> None:
    """Put the base weights back as they were before merging (bit-exact, ties included)."""
    for layer in _layers(model):
        layer.unmerge()


def eject_adapters(model: nn.Module, merge: bool = True) -> nn.Module:
    """Give the plain modules back: merged into them (``merge=True``) or dropped.

    Returns the model, now free of tunekit wrappers, ready for ``save_pretrained``. A merged
    output head that was tied to the input embeddings keeps its own weight (the embeddings
    are unchanged) and the config says ``tie_word_embeddings=False``, so it saves and reloads as is.
    """
    if merge:
        names = active_adapters(model)
        for _, host in iter_hosts(model):
            reason = host.cannot_eject_merged_reason([n for n in names if n in host.adapters])
            if reason:
                raise NotMergeableError(reason)
    for path, host in reversed(list(iter_hosts(model))):
        _remove_host(model, path, host, merge=merge)
    model.tunekit_adapter_configs = {}
    model.tunekit_active_adapters = []
    exclude_adapters_from_save(model)
    if merge:
        untie_merged_head(model)
    for p in model.parameters():
        # a plain model trains everything again; packed quantized weights (uint8) never do
        p.requires_grad_(p.dtype.is_floating_point)
    return model


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def share(self) -> float:
        return self.trainable / max(self.total, 1)

    def __str__(self) -> str:
        return (
            f"trainable params: {self.trainable:,} || all params: {self.total:,} "
            f"|| trainable%: {100 * self.share:.4f}"
        )


def _numel(p: nn.Parameter) -> int:
    # bitsandbytes packs two 4-bit values per byte of its storage dtype (as PEFT counts them).
    if type(p).__name__ == "Params4bit":
        return p.numel() * 2 * p.element_size()
    return p.numel()


def trainable_parameters(model: nn.Module) -> ParamCount:
    """Trainable and total parameter counts; ``print()`` it for PEFT's one-liner.

    Frozen bases kept inside wrappers count once; inactive adapters count as
    frozen parameters.
    """
    trainable = total = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return ParamCount(trainable, total)
