"""What a push uploads: an explicit list of files, never "the folder".

    adapter   adapter_config.json, adapter_model.safetensors (PEFT's format where the method
              has one), tunekit_base.json, tokenizer files saved beside them, and the same
              for every named adapter in a sub-folder
    model     config.json, generation_config.json, model.safetensors or its shards + index,
              tokenizer files (a merged model, or a base pushed with --push-base)

Checkpoints, optimizer state, logs and anything else in the folder stay home.
JSON files are rewritten for the public: ``base_model_name_or_path`` and
``tunekit_base.json``'s ``model.name_or_path`` become the base's Hub id, and
any other absolute path of this machine becomes its file name; a last guard
refuses a manifest whose text still holds a local path.
"""

from __future__ import annotations

import fnmatch
import json
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunekit.hub.access import PushError

__all__ = ["BASE_INFO_NAME", "Manifest", "adapter_manifest", "check_model_weights", "check_no_local_paths",
           "hub_id_or_none", "local_roots", "locate", "model_manifest", "public_json"]

BASE_INFO_NAME = "tunekit_base.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", BASE_INFO_NAME)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "chat_template.jinja", "chat_template.json")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "model-*-of-*.safetensors")
_TEXT_SUFFIXES = (".json", ".md", ".txt", ".jinja", ".yaml", ".yml")


@dataclass
class Manifest:
    """The files of one push: path in the repo -> a local file or the (rewritten) bytes to upload."""

    kind: str
    """"adapter" or "model" (a merged model or a base)."""
    folder: Path
    files: dict[str, Path | bytes] = field(default_factory=dict)
    left_out: list[str] = field(default_factory=list)
    """Files in the folder that are not pushed (logs, checkpoints, pickles, ...)."""

    def size(self) -> int:
        return sum(len(v) if isinstance(v, bytes) else v.stat().st_size for v in self.files.values())


def hub_id_or_none(name: str | None) -> str | None:
    """``name`` if it is a Hub model id (not a local folder, absolute path or ``pkg:``), else None."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not name or name.startswith(("pkg:", ".", "/", "~")) or Path(name).expanduser().exists():
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def locate(source: str | Path, merged: bool) -> tuple[Path, Path | None]:
    """(folder to push, run folder or None) for a run folder, an adapter folder or a model folder."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise PushError(f"{source} is not a folder: pass a run folder (output.dir) or its adapter/ folder")
    run = next((p for p in (path, path.parent) if (p / "resolved_config.yaml").is_file()), None)
    if merged:
        for candidate in (path, path / "merged", path.parent / "merged"):
            if (candidate / "config.json").is_file() and not (candidate / "adapter_config.json").is_file():
                return candidate, run
        where = run or path
        raise PushError(f"no merged model in {path}: set output.save_merged: true, or run "
                        f"`tunekit merge {where / 'adapter'} --out {where / 'merged'}`, then push again")
    for candidate in (path, path / "adapter"):
        if (candidate / "adapter_config.json").is_file():
            return candidate, run
    hint = "; it holds a model: add --merged" if (path / "config.json").is_file() else ""
    raise PushError(f"no adapter in {path}: expected adapter_config.json (a run's adapter/ folder) or a run folder "
                    f"holding adapter/{hint}")


def _is_local_path(value: str) -> bool:
    return value.startswith(("/", "~", "./", "../")) or (len(value) > 2 and value[1] == ":" and value[2] in "\\/")


def public_json(data: Any, base_model: str | None, key: str = "") -> Any:
    """``data`` with local paths removed: ``*name_or_path`` keys get the base's Hub id, other paths their name."""
    if isinstance(data, dict):
        return {k: public_json(v, base_model, k) for k, v in data.items()}
    if isinstance(data, list):
        return [public_json(v, base_model, key) for v in data]
    if isinstance(data, str) and (_is_local_path(data) or (key.endswith("name_or_path") and data.startswith("pkg:"))):
        return base_model if key.endswith("name_or_path") else Path(data).name
    return data


def _json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _adapter_record(folder: Path, base_model: str, base_revision: str | None, tokenizer_repo: str | None) -> bytes:
    record = json.loads((folder / BASE_INFO_NAME).read_text(encoding="utf-8"))
    model = record["model"]
    model.update(name_or_path=base_model, revision=base_revision)
    if model.get("tokenizer") and hub_id_or_none(model["tokenizer"]) is None:
        model["tokenizer"] = tokenizer_repo  # the tokenizer files travel with the adapter, or the base's is used
    return _json_bytes(public_json(record, base_model))


def _adapter_config(folder: Path, base_model: str, base_revision: str | None) -> bytes:
    saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if "peft_type" in saved:  # PEFT loads the base from here
        saved["base_model_name_or_path"] = base_model
        saved["revision"] = base_revision
    return _json_bytes(public_json(saved, base_model))


def _adapter_folders(folder: Path) -> list[tuple[str, Path]]:
    """("" or the adapter's name, its folder) for the top adapter and every named one beside it."""
    found = [("", folder)] if (folder / "adapter_config.json").is_file() else []
    found += [(sub.name, sub) for sub in sorted(folder.iterdir())
              if sub.is_dir() and (sub / "adapter_config.json").is_file()]
    return found


def adapter_manifest(folder: Path, base_model: str, base_revision: str | None = None,
                     repo_id: str | None = None) -> Manifest:
    """The files of an adapter folder (and its named sub-adapters), rewritten to name ``base_model``."""
    manifest = Manifest("adapter", folder)
    for name, sub in _adapter_folders(folder):
        prefix = f"{name}/" if name else ""
        if not (sub / "adapter_model.safetensors").is_file():
            raise PushError(f"{sub} has adapter_config.json but no adapter_model.safetensors; save it again")
        tokenizer = [f for f in TOKENIZER_FILES if (sub / f).is_file()]
        manifest.files[prefix + "adapter_config.json"] = _adapter_config(sub, base_model, base_revision)
        manifest.files[prefix + "adapter_model.safetensors"] = sub / "adapter_model.safetensors"
        if (sub / BASE_INFO_NAME).is_file():
            manifest.files[prefix + BASE_INFO_NAME] = _adapter_record(sub, base_model, base_revision,
                                                                      repo_id if tokenizer else None)
        for file in tokenizer:
            manifest.files[prefix + file] = _public_file(sub / file, base_model)
    _note_left_out(manifest)
    return manifest


def _public_file(path: Path, base_model: str | None) -> Path | bytes:
    if path.suffix != ".json":
        return path
    return _json_bytes(public_json(json.loads(path.read_text(encoding="utf-8")), base_model))


def model_manifest(folder: Path, base_model: str | None) -> Manifest:
    """The files of a ``save_pretrained`` folder (safetensors only, shards checked against their index)."""
    manifest = Manifest("model", folder)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    weights = [n for n in names if fnmatch.fnmatch(n, "model*.safetensors")]
    if not weights:
        pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth"))]
        why = f" (only {pickles[0]}: tunekit never pushes pickles; re-save with safetensors)" if pickles else ""
        raise PushError(f"{folder} holds no model.safetensors{why}")
    if "model.safetensors.index.json" in names:
        index = json.loads((folder / "model.safetensors.index.json").read_text(encoding="utf-8"))
        shards = set(index.get("weight_map", {}).values())
        missing = sorted(shards - set(weights))
        if missing:
            raise PushError(f"{folder}: the shard index names {missing[0]}, which is missing; save the model again")
        weights = sorted(shards)
    for name in names:
        if any(fnmatch.fnmatch(name, p) for p in MODEL_FILES + TOKENIZER_FILES):
            if name.endswith(".safetensors") and name not in weights:
                continue  # a stale shard the index does not name
            manifest.files[name] = _public_file(folder / name, base_model)
    _note_left_out(manifest)
    return manifest


def _note_left_out(manifest: Manifest) -> None:
    # The run's README.md is not left out: the push writes the same card, with the repo's own facts.
    pushed = {Path(p).name for p in manifest.files} | {"README.md"}
    manifest.left_out = sorted(p.name for p in manifest.folder.iterdir() if p.is_file() and p.name not in pushed)


def local_roots(*folders: Path | None) -> list[str]:
    """Absolute paths of this machine that must never appear in a pushed text file."""
    roots = {str(Path.home()), str(Path.cwd()), sys.prefix, tempfile.gettempdir()}
    roots |= {str(f.resolve()) for f in folders if f is not None}
    return sorted(r for r in roots if r.strip("/") and len(r) > 3)


def check_no_local_paths(files: dict[str, Path | bytes], roots: list[str]) -> None:
    """Refuse a text file that would publish one of ``roots`` (the last guard of a push)."""
    for name, value in files.items():
        if not name.endswith(_TEXT_SUFFIXES):
            continue
        text = (value if isinstance(value, bytes) else value.read_bytes()).decode("utf-8", errors="replace")
        for root in roots:
            if root + "/" in text or f'"{root}"' in text:
                raise PushError(f"{name} would publish the local path {root!r}; remove it from the file "
                                "(tunekit rewrites the paths it writes, so this came from elsewhere)")


def check_model_weights(manifest: Manifest) -> None:
    """Every floating tensor of the manifest's safetensors files is finite (read one tensor at a time)."""
    import torch
    from safetensors import safe_open

    for name, value in manifest.files.items():
        if not name.endswith(".safetensors") or isinstance(value, bytes):
            continue
        with safe_open(str(value), framework="pt") as weights:
            for key in weights.keys():
                tensor = weights.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise PushError(f"{value}: tensor {key!r} holds NaN/Inf values; the model is not pushed")
