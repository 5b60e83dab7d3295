"""Where a model's ``config.json`` comes from: never weights, and offline when possible.

``load_model_config(name)`` accepts, in this order:

1. a ``config.json`` file, or a local folder / ``pkg:<package>`` holding one
   (``tunekit.models.resolve_source`` resolves them, as training does);
2. a Hub id found in the local Hugging Face cache (``local_files_only``);
3. a Hub id with a shipped snapshot: ``cookbook/models/<org>--<name>/config.json``
   (the folder name is the Hub id with ``/`` written ``--``, as the Hub cache
   names folders). The snapshots are the published configs, no weights, so
   every cookbook recipe estimates offline and the same on every machine;
4. otherwise the Hub (only ``config.json`` is fetched), unless ``HF_HUB_OFFLINE``
   is set.

The answer says which one it used (``ConfigSource.origin``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["SNAPSHOT_DIR", "ConfigSource", "load_model_config", "shipped_snapshots", "snapshot_folder"]

SNAPSHOT_DIR = Path(__file__).resolve().parents[2] / "cookbook" / "models"


@dataclass(frozen=True)
class ConfigSource:
    """A transformers config and where it was read."""

    config: Any
    """The ``PretrainedConfig``."""
    origin: str
    """A folder, file, cache or snapshot path, or ``hub:<id>``."""


def snapshot_folder(hub_id: str) -> Path | None:
    """The shipped snapshot folder of ``hub_id`` (``org/name``), or None."""
    if hub_id.count("/") != 1:
        return None
    folder = SNAPSHOT_DIR / hub_id.replace("/", "--")
    return folder if (folder / "config.json").is_file() else None


def shipped_snapshots() -> list[str]:
    """Hub ids with a shipped ``config.json`` snapshot."""
    if not SNAPSHOT_DIR.is_dir():
        return []
    return sorted(d.name.replace("--", "/", 1) for d in SNAPSHOT_DIR.iterdir() if (d / "config.json").is_file())


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else type(err).__name__


def _read(path: Path | str, what: str, **kwargs: Any) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{what}: cannot read a model config ({_first_line(err)})") from None


def _from_file(file: Path) -> Any:
    import json

    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not a readable JSON config ({_first_line(err)})") from None
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if not model_type:
        raise ValueError(f"{file}: has no model_type, so transformers cannot tell the architecture")
    return build_config(model_type, raw, str(file))


def build_config(model_type: str, fields: dict[str, Any], what: str) -> Any:
    """The ``model_type`` config class built from ``fields``, with one-line errors for bad input."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type not in CONFIG_MAPPING:
        raise ValueError(f"{what}: model_type {model_type!r} is not an architecture transformers knows "
                         "(e.g. llama, qwen2, mistral, gemma2, gpt2, bert, roberta, t5)")
    try:
        return CONFIG_MAPPING[model_type].from_dict({**fields, "model_type": model_type})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what}: invalid {model_type} config ({_first_line(err)})") from None


def _hub_config(name: str) -> ConfigSource:
    try:
        return ConfigSource(_read(name, name, local_files_only=True), f"Hugging Face cache ({name})")
    except ValueError:
        pass
    folder = snapshot_folder(name)
    if folder is not None:
        shown = folder.relative_to(SNAPSHOT_DIR.parents[1]) if SNAPSHOT_DIR.parents[1] in folder.parents else folder
        return ConfigSource(_read(folder, str(folder)), f"{shown} (snapshot of {name})")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise ValueError(f"{name!r}: not in the Hugging Face cache, no shipped snapshot in {SNAPSHOT_DIR}, and "
                         "HF_HUB_OFFLINE is set; pass a folder (or file) with the model's config.json")
    return ConfigSource(_read(name, name), f"hub:{name}")


def load_model_config(name: str, overrides: dict[str, Any] | None = None) -> ConfigSource:
    """The config of ``name`` (see the module docstring), with ``overrides`` set on it.

    Raises:
        ValueError: one line naming the source and the problem (missing folder or
            config.json, unknown model type, unreadable file, unreachable Hub).
    """
    from tunekit.models.loading import resolve_source

    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".json":
            raise ValueError(f"{name!r} is a file but not a config.json (or a finetune .yaml); pass a model "
                             "folder, a config.json, a Hub id or pkg:<package>")
        source = ConfigSource(_from_file(path), str(path))
    else:
        resolved = resolve_source(name, key="model")
        folder = Path(resolved)
        if folder.is_dir():
            if not (folder / "config.json").is_file():
                raise ValueError(f"{resolved}: this folder holds no config.json, so it is not a model folder")
            source = ConfigSource(_from_file(folder / "config.json"), str(folder))
        else:
            source = _hub_config(resolved)
    for field, value in (overrides or {}).items():
        setattr(source.config, field, value)
    return source
