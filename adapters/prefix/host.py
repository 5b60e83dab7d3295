"""Model-level hosts for virtual-token adapters (prefix and prompt tuning).

These methods change a model's *inputs* (its cache, or its input
embeddings), so they wrap no layer. One host hangs at the model root
(``model.tunekit_prefix`` / ``model.tunekit_prompt``) and holds the named
adapters like any ``AdapterHost``, so switching, disabling, deleting, saving
and counting go through the core unchanged. A forward pre-hook on the model
(keyword-aware, removable; its handle is kept here) rewrites the call:

    model(**batch) ─► pre-hook: host.current() adapter ─► kwargs + virtual tokens ─► HF forward

The model stays the HF model it was; ``eject`` removes hook and host.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from tunekit.adapters.host import AdapterHost, ModulesToSave
from tunekit.adapters.registry import host_state, load_host_state

# PEFT keeps a prompt-learning model's modules_to_save under "base_model." (no LoRA ".model").
PROMPT_LEARNING_PREFIX = "base_model."


class VirtualTokenHost(AdapterHost):
    """Holds named virtual-token adapters at the model root and applies the active one."""

    attribute: str = ""
    """Attribute of the model root the host is attached as."""
    what: str = ""
    """Method name used in messages."""

    def __init__(self, model: nn.Module) -> None:
        # transformers is imported on first use, not when tunekit.adapters is imported.
        from tunekit.adapters.hf.prefix_cache import VirtualTokenHooks, virtual_token_geometry

        super().__init__()
        self.geometry = virtual_token_geometry(model)
        self.hooks = VirtualTokenHooks(model)
        self._handles: list[RemovableHandle] = []

    @classmethod
    def attach(cls, model: nn.Module) -> VirtualTokenHost:
        """The model's host of this kind, created and hooked in on first use."""
        host = getattr(model, cls.attribute, None)
        if isinstance(host, cls):
            return host
        host = cls(model)
        setattr(model, cls.attribute, host)
        host.register(model)
        return host

    def register(self, model: nn.Module) -> None:
        """Install the forward pre-hooks (subclasses add more)."""
        self._handles.append(model.register_forward_pre_hook(self.pre_hook, with_kwargs=True))

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        raise NotImplementedError

    def set_active(self, names: Iterable[str]) -> None:
        super().set_active(names)
        if len(self.active) > 1:
            raise ValueError(
                f"only one {self.what} adapter can be active at a time; got {self.active}. "
                "Call set_active_adapters(model, name) with one of them"
            )

    def current(self) -> str | None:
        """The adapter to apply now, or None (disabled, or none active)."""
        return None if self.disabled or not self.active else self.active[0]

    def eject(self, model: nn.Module, merge: bool) -> None:
        """Detach from ``model``: remove the hooks and the host itself."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.hooks.use_stateless(None)
        if getattr(model, self.attribute, None) is self:
            delattr(model, self.attribute)

    def model_dtype(self, module: nn.Module) -> torch.dtype:
        return getattr(module, "dtype", None) or next(self.parameters()).dtype


def export_modules_to_save(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The adapter's fully trained modules under PEFT's prompt-learning keys (``base_model.<path>.<param>``)."""
    return {PROMPT_LEARNING_PREFIX + k: v for k, v in host_state(model, name, (ModulesToSave,)).items()}


def import_modules_to_save(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> None:
    """Inverse of ``export_modules_to_save``; every other key must already be consumed."""
    stripped = {k[len(PROMPT_LEARNING_PREFIX):] if k.startswith(PROMPT_LEARNING_PREFIX) else k: v
                for k, v in state.items()}
    load_host_state(model, name, (ModulesToSave,), stripped)
