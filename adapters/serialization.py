"""Save and load adapters: safetensors + JSON, never pickle.

Layout (PEFT's, so the ecosystem loads what tunekit writes):

    out/adapter_config.json          the adapter named "default", or the only one
    out/adapter_model.safetensors
    out/<name>/adapter_config.json   every other named adapter
    out/<name>/adapter_model.safetensors

Methods PEFT also has (LoRA, prefix, prompt tuning) write PEFT's config
fields and key names; the others write ``{"tunekit_method": ...}`` configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunekit.adapters.api import active_adapters, adapter_configs, inject_adapters, set_active_adapters
from tunekit.adapters.config import AdapterConfig
from tunekit.adapters.registry import METHODS, PEFT_TYPES, AdapterMethod, method_for

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _folder_for(root: Path, name: str, names: list[str]) -> Path:
    return root if len(names) == 1 or name == "default" else root / name


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """Adapter ``name``'s tensors under the keys written to ``adapter_model.safetensors``."""
    cfg = adapter_configs(model)[name]
    return method_for(cfg).export_state(model, name, cfg)


def save_adapters(model: nn.Module, path: str | Path, names: list[str] | None = None) -> list[Path]:
    """Write the adapters (all, or ``names``) to ``path``; return the folders written."""
    configs = adapter_configs(model)
    names = list(names) if names is not None else list(configs)
    if not names:
        raise ValueError("this model has no adapters to save; inject_adapters() first")
    written = []
    for name in names:
        if name not in configs:
            raise ValueError(f"no adapter named {name!r}; this model has {sorted(configs)}")
        folder = _folder_for(Path(path), name, names)
        folder.mkdir(parents=True, exist_ok=True)
        method = method_for(configs[name])
        state = {k: v.detach().to("cpu").contiguous() for k, v in adapter_state_dict(model, name).items()}
        save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
        saved_cfg = method.export_config(model, configs[name])
        (folder / CONFIG_NAME).write_text(json.dumps(saved_cfg, indent=2, sort_keys=True) + "\n")
        written.append(folder)
    return written


def read_adapter_config(folder: str | Path) -> tuple[AdapterMethod, AdapterConfig]:
    """The method and config of the adapter saved in ``folder`` (tunekit's or PEFT's)."""
    file = Path(folder) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: point at a folder written by save_adapters() or PEFT's save_pretrained()")
    saved = json.loads(file.read_text())
    if "tunekit_method" in saved:
        method = METHODS.get(saved["tunekit_method"])
    else:
        method = PEFT_TYPES.get(saved.get("peft_type", ""))
    if method is None:
        kind = saved.get("tunekit_method") or saved.get("peft_type")
        known = sorted(METHODS) + sorted(PEFT_TYPES)
        raise ValueError(f"{file}: adapter type {kind!r} is not supported by tunekit (supported: {known})")
    return method, method.import_config(saved)


def load_adapters(model: nn.Module, path: str | Path, name: str = "default", activate: bool = True) -> AdapterConfig:
    """Inject the adapter saved in ``path`` (tunekit or PEFT) as ``name`` and load its weights.

    Returns the adapter's config. Raises a clear error on a missing folder,
    an unsupported type, or weights that do not fit this model.
    """
    folder = Path(path)
    method, cfg = read_adapter_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found (only {WEIGHTS_NAME} is read; tunekit never unpickles .bin files)")
    state = load_file(str(weights))
    previously_active = active_adapters(model)
    inject_adapters(model, cfg, name, activate=True)
    try:
        method.import_state(model, name, cfg, state)
    except Exception:
        from tunekit.adapters.api import delete_adapter

        delete_adapter(model, name)
        raise
    if not activate and previously_active:
        set_active_adapters(model, previously_active)
    return cfg
