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
    """Wrap-and-replace host: owns the original module as ``base_layer`` (frozen)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged: list[str] = []

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
        with torch.no_grad():
            for name in names:
                self._fold(name, safe)
                self.merged.append(name)

    def unmerge(self) -> None:
        """Undo every merge, last merged first."""
        with torch.no_grad():
            while self.merged:
                self._unfold(self.merged.pop())

    def _fold(self, name: str, safe: bool) -> None:
        """Add adapter ``name`` into the base weights (only called when ``cannot_merge_reason`` allows)."""
        raise NotMergeableError(f"{type(self).__name__} adapters cannot be merged into the base weights")

    def _unfold(self, name: str) -> None:
        """Subtract what ``_fold`` added."""
        raise NotMergeableError(f"{type(self).__name__} adapters cannot be unmerged")

    def eject(self, merge: bool) -> nn.Module:
        """Return the plain module that replaces this wrapper (merged or not)."""
        if merge:
            self.merge(self.active)
        else:
            self.unmerge()
        return self.base_layer


class ModulesToSave(AdapterLayer):
    """A module trained in full (e.g. a new classification head), one copy per adapter.

    The original stays frozen as ``base_layer``; the active adapter's copy is
    used in ``forward``. Saved under the module's own key (PEFT's format).
    """

    def add_adapter(self, name: str, adapter: nn.Module | None = None) -> None:
        import copy

        copy_ = adapter if adapter is not None else copy.deepcopy(self.base_layer)
        for p in copy_.parameters():
            p.requires_grad_(True)
        super().add_adapter(name, copy_)

    def forward(self, *args, **kwargs):
        active = self.unmerged_active()
        if not active:
            return self.base_layer(*args, **kwargs)
        return self.adapters[active[0]](*args, **kwargs)

    def cannot_merge_reason(self, names: list[str]) -> str | None:
        return None

    def merge(self, names: Iterable[str] | None = None, safe: bool = True) -> None:
        """Nothing to fold: the trained copy is already the module in use."""

    def unmerge(self) -> None:
        """Nothing to undo (see ``merge``)."""

    def eject(self, merge: bool) -> nn.Module:
        # "Merging" a fully trained copy means keeping the copy.
        return self.adapters[self.active[0]] if merge and self.active else self.base_layer
