"""Adapter hosts: the modules that hold named adapters inside a model.

Every adapter method puts its trainable state into ``AdapterHost`` modules:
wrap-and-replace methods (LoRA, bottlenecks, modules_to_save) use
``AdapterLayer``, which owns the original module as ``base_layer``; methods
that act on the whole model (prefix, prompt tuning) attach one host at the
model root. Model-level functions (switch, disable, delete, merge, save) walk
``model.modules()`` for hosts, so they work the same for every method.

Several named adapters live side by side in ``host.adapters`` (a ModuleDict);
``host.active`` names the ones applied in ``forward``.

    x ──► base_layer ──────────────► (+) ──► y
     └──► adapters[active] ──────────┘
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from tunekit.adapters.hf.layers import adapter_dtype, is_quantized


class AdapterHost(nn.Module):
    """A module holding named adapters of one method."""

    def __init__(self) -> None:
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False

    def add_adapter(self, name: str, adapter: nn.Module) -> None:
        if name in self.adapters:
            raise ValueError(f"adapter {name!r} already exists here; delete it first or pick another name")
        adapter.train(self.training)  # a model in eval mode gets its new adapter in eval mode (no dropout)
        self.adapters[name] = adapter
        if not self.active:
            self.active = [name]

    def remove_adapter(self, name: str) -> None:
        if name in self.adapters:
            del self.adapters[name]
        self.active = [n for n in self.active if n != name]

    def set_active(self, names: Iterable[str]) -> None:
        self.active = [n for n in names if n in self.adapters]

    def adapter_params(self, name: str | None = None) -> Iterator[nn.Parameter]:
        """The trainable parameters of adapter ``name`` (all adapters when None)."""
        for key, adapter in self.adapters.items():
            if name is None or key == name:
                yield from adapter.parameters()

    def adapter_state(self, name: str) -> dict[str, torch.Tensor]:
        """State of one adapter, keys relative to this host."""
        return {k: v for k, v in self.adapters[name].state_dict().items()}

    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        self.adapters[name].load_state_dict(state, strict=True)

    def cannot_eject_merged_reason(self, names: list[str]) -> str | None:
        """Why ``eject(merge=True)`` would fail for ``names``, or None."""
        return "prefix and prompt adapters act on the inputs, not on weights: they cannot be merged" if names else None

    def extra_repr(self) -> str:
        return f"active={self.active}, disabled={self.disabled}"


class NotMergeableError(ValueError):
    """Raised when an adapter cannot be folded into its base weights."""


class AdapterLayer(AdapterHost):
    """Wrap-and-replace host: owns the original module as ``base_layer`` (frozen).

    Merging gives ``base_layer`` new weight Parameters holding the folded result and
    keeps the original Parameters aside; ``unmerge`` puts those back. So the base is
    bit-exact after an unmerge in any dtype (a bf16 ``W + ΔW − ΔW`` is not), and a
    weight shared with another module (an output head tied to the input embeddings)
    is never written: the head gets its own merged copy and the embeddings stay as
    they were. The cost is one extra copy of each merged weight while merged;
    ``eject_adapters(merge=True)`` drops the originals layer by layer.

    State-dict keys skip the ``base_layer`` level (``q_proj.weight``, not
    ``q_proj.base_layer.weight``) and hold the unmerged base even while merged, so a
    model's ``state_dict()`` is its base model's plus the ``adapters.*`` tensors, and
    ``load_state_dict`` takes either spelling (torchtune's ``FusionEmbedding`` does the
    same; ``_fqn_modifiers`` tells ``torch.distributed.checkpoint``).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged: list[str] = []
        # Plain dict, not registered: the originals are no part of parameters() or state_dict().
        self._unmerged_params: dict[str, nn.Parameter] = {}
        self.register_state_dict_post_hook(_skip_base_level)
        self.register_load_state_dict_pre_hook(_restore_base_level)

    def _fqn_modifiers(self) -> dict[str, str]:
        """torch.distributed.checkpoint's hook: state-dict names found through ``base_layer``."""
        base = self.base_layer
        return {name: "base_layer" for name in (*base._parameters, *base._buffers, *base._modules)}

    def unmerged_active(self) -> list[str]:
        if self.disabled:
            return []
        return [n for n in self.active if n not in self.merged]

    def cannot_merge_reason(self, names: list[str]) -> str | None:
        """Why ``names`` cannot be merged here, or None when they can."""
        if not names:
            return None
        return f"{type(self).__name__} adapters cannot be merged into the base weights"

    def cannot_eject_merged_reason(self, names: list[str]) -> str | None:
        return self.cannot_merge_reason(names)

    def merge(self, names: Iterable[str] | None = None, safe: bool = True) -> None:
        """Fold ``names`` (default: the active adapters) into the base; already-merged ones are skipped."""
        names = [n for n in (names if names is not None else self.active) if n not in self.merged]
        reason = self.cannot_merge_reason(names)
        if reason:
            raise NotMergeableError(reason)
        if names and not self.merged:
            self._unmerged_params = dict(self.base_layer.named_parameters(recurse=False))
        with torch.no_grad():
            for name in names:
                self._fold(name, safe)
                self.merged.append(name)

    def unmerge(self) -> None:
        """Undo every merge: the original base Parameters are put back (bit-exact, ties restored)."""
        for key, param in self._unmerged_params.items():
            setattr(self.base_layer, key, param)
        self._unmerged_params = {}
        self.merged.clear()

    def _fold(self, name: str, safe: bool) -> None:
        """Give the base new Parameters with adapter ``name`` folded in (only called when
        ``cannot_merge_reason`` allows; never writes the current Parameters in place)."""
        raise NotMergeableError(f"{type(self).__name__} adapters cannot be merged into the base weights")

    def _apply(self, fn, recurse: bool = True):
        # .to() / .half() / .cuda() on a merged model must move the kept originals too.
        super()._apply(fn, recurse)
        with torch.no_grad():
            for param in self._unmerged_params.values():
                param.data = fn(param)
        return self

    def eject(self, merge: bool) -> nn.Module:
        """Return the plain module that replaces this wrapper (merged or not)."""
        if merge:
            self.merge(self.active)
        else:
            self.unmerge()
        return self.base_layer


def _skip_base_level(module: AdapterLayer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    inner = prefix + "base_layer."
    for key, original in module._unmerged_params.items():  # while merged: the base as it was
        value = state_dict[inner + key]
        state_dict[inner + key] = original if isinstance(value, nn.Parameter) else original.detach()
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _restore_base_level(module: AdapterLayer, state_dict: dict, prefix: str, *_) -> None:
    inner, own = prefix + "base_layer.", prefix + "adapters."
    plain = [k for k in state_dict if k.startswith(prefix) and not k.startswith((inner, own))
             and inner + k[len(prefix):] not in state_dict]
    if plain and module.merged:
        raise ValueError(f"cannot load base weights into {prefix.rstrip('.')!r} while adapters "
                         f"{module.merged} are merged into it: unmerge_adapters(model) first")
    for key in plain:
        state_dict[inner + key[len(prefix):]] = state_dict.pop(key)


class ModulesToSave(AdapterLayer):
    """A module trained in full (e.g. a new classification head), one copy per adapter.

    The original stays frozen as ``base_layer``; the active adapter's copy is
    used in ``forward``. Saved under the module's own key (PEFT's format).
    Beside a bf16/fp16 base the copy trains in fp32, as LoRA weights do
    (``adapter_dtype``): a bf16 head loses small optimizer updates to rounding.
    Its floating inputs are cast to fp32 and its outputs back to the base's dtype.
    """

    def add_adapter(self, name: str, adapter: nn.Module | None = None) -> None:
        import copy

        copy_ = adapter if adapter is not None else copy.deepcopy(self.base_layer)
        if not is_quantized(self.base_layer):
            copy_.to(adapter_dtype(self.base_layer))
        for p in copy_.parameters():
            p.requires_grad_(True)
        super().add_adapter(name, copy_)

    def forward(self, *args, **kwargs):
        active = self.unmerged_active()
        if not active:
            return self.base_layer(*args, **kwargs)
        copy_ = self.adapters[active[0]]
        dtype, out_dtype = _float_dtype(copy_), _float_dtype(self.base_layer)
        if dtype == out_dtype:
            return copy_(*args, **kwargs)
        out = copy_(*_cast_floats(args, dtype), **{k: _cast_floats(v, dtype) for k, v in kwargs.items()})
        return _cast_floats(out, out_dtype)

    def cannot_merge_reason(self, names: list[str]) -> str | None:
        return None

    def merge(self, names: Iterable[str] | None = None, safe: bool = True) -> None:
        """Nothing to fold: the trained copy is already the module in use."""

    def unmerge(self) -> None:
        """Nothing to undo (see ``merge``)."""

    def eject(self, merge: bool) -> nn.Module:
        # "Merging" a fully trained copy means keeping the copy, in the dtype of the model around it.
        if not (merge and self.active):
            return self.base_layer
        copy_ = self.adapters[self.active[0]]
        dtype = _float_dtype(self.base_layer)
        return copy_.to(dtype) if dtype is not None else copy_


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _cast_floats(value, dtype: torch.dtype | None):
    """``value`` with its floating tensors (also inside plain tuples and lists) cast to ``dtype``."""
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if type(value) in (tuple, list):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value
