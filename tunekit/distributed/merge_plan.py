"""Merging a saved adapter into its base: streamed shard by shard where that gives the same model.

``tunekit merge`` and ``output.save_merged`` both call ``merge_saved_adapter``. It streams
(``stream_merge``: peak memory about one safetensors shard, so a base trained sharded over
several GPUs merges on one CPU host) when the result is the one an in-memory merge gives:

- a LoRA / DoRA adapter on an unquantized base whose safetensors are on disk (a local folder,
  ``pkg:``, a ``model.from_config`` run's ``base/``, or a Hub snapshot);
- every adapter tensor lands on a base weight of its shape (a new classification head,
  which exists only in the trained model, does not);
- the tokenizer adds no token the base's embeddings lack.

Otherwise it loads the base whole and merges in memory (``tunekit.inference.merge_adapter``,
which also merges a QLoRA adapter into the dequantized 4-bit weights it was trained against),
and says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tunekit.distributed.merge import INDEX, base_shards, stream_merge

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class MergeOutcome:
    """Where the merged model went and how it was made."""

    out_dir: Path
    streamed: bool
    reason: str = ""
    """Why the base was loaded whole (empty when streamed)."""

    def summary(self) -> str:
        how = "streamed shard by shard" if self.streamed else f"loaded whole: {self.reason}"
        return f"merged model written to {self.out_dir} ({how})"


def _base_record(adapter_dir: Path) -> dict[str, Any]:
    """The base's ``model:`` fields (tunekit_base.json, or the PEFT config's base name)."""
    from tunekit.api import BASE_INFO_NAME

    record = adapter_dir / BASE_INFO_NAME
    if record.is_file():
        return json.loads(record.read_text(encoding="utf-8"))["model"]
    config = adapter_dir / "adapter_config.json"
    saved = json.loads(config.read_text(encoding="utf-8")) if config.is_file() else {}
    return {"name_or_path": saved.get("base_model_name_or_path")}


def _local_base(name: str, revision: str | None) -> Path | None:
    """The base's folder on this machine (a Hub id: its snapshot, downloaded if need be), or None."""
    from tunekit.models import resolve_source

    source = resolve_source(name)
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=revision, allow_patterns=_SNAPSHOT_FILES))
    except Exception:  # noqa: BLE001 - offline, gated, missing: the in-memory merge reports it properly
        return None


def _shapes_on_disk(base: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for name in base_shards(base):
        with safe_open(str(base / name), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    return shapes


def _adapter_fits(adapter_dir: Path, shapes: dict[str, tuple[int, ...]]) -> str:
    """Why the adapter's tensors do not all land on base weights of their shapes ("" when they do)."""
    from tunekit.adapters.hf.peft_format import strip_peft_prefix
    from tunekit.adapters.serialization import WEIGHTS_NAME

    with safe_open(str(adapter_dir / WEIGHTS_NAME), framework="pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    for key, shape in strip_peft_prefix(saved).items():
        if any(key.endswith(f".{factor}") for factor in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")):
            continue  # factors merge into the weight of their module; stream_merge checks those shapes
        target = key.replace(".base_layer.", ".")
        if shapes.get(target) != shape:
            return f"adapter tensor {key!r} has no base weight of shape {shape} on disk (a new head?)"
    return ""


def plan_merge(adapter_dir: str | Path, base: str | None = None) -> tuple[Path | None, str]:
    """(the base folder to stream from, "") or (None, why the base must be loaded whole)."""
    from tunekit.adapters import read_adapter_config
    from tunekit.models import ModelConfig, load_tokenizer

    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder} is not an adapter folder (no adapter_config.json); pass the run's adapter/ folder")
    _, cfg = read_adapter_config(folder)
    if cfg.method != "lora":
        return None, f"a {cfg.method} adapter does not merge into weights"
    record = _base_record(folder)
    if record.get("quantization"):
        return None, "the adapter was trained on a quantized base: it merges into the dequantized weights"
    name = base or record.get("name_or_path")
    if not name:
        return None, "the adapter does not record its base"
    local = _local_base(name, None if base else record.get("revision"))
    if local is None or not ((local / INDEX).is_file() or (local / "model.safetensors").is_file()):
        return None, f"no safetensors weights of {name!r} on disk"
    shapes = _shapes_on_disk(local)
    reason = _adapter_fits(folder, shapes)
    if reason:
        return None, reason
    model_cfg = ModelConfig(**{**record, "name_or_path": str(local), "tokenizer": None if base else record.get("tokenizer")})
    vocab = json.loads((local / "config.json").read_text(encoding="utf-8")).get("vocab_size")
    if vocab is not None and len(load_tokenizer(model_cfg)) > vocab:
        return None, "the tokenizer adds a token the base's embeddings lack (they are resized on load)"
    return local, ""


def merge_saved_adapter(adapter_dir: str | Path, out: str | Path, base: str | None = None,
                        dtype: str | None = None) -> MergeOutcome:
    """Merge ``adapter_dir`` into its base (or ``base``) and write a plain transformers model + tokenizer to ``out``.

    Args:
        dtype: of the merged weights ("fp32", "bf16", "fp16"); default the training dtype
            (the files' own for ``auto``; fp32 for a quantized base).
    """
    from tunekit.inference import merge_adapter
    from tunekit.models import ModelConfig, load_tokenizer

    out = Path(out)
    local, reason = plan_merge(adapter_dir, base)
    if local is None:
        merge_adapter(adapter_dir, out, base=base, dtype=dtype)
        return MergeOutcome(out, False, reason)
    record = _base_record(Path(adapter_dir))
    wanted = dtype or record.get("dtype") or "fp32"
    stream_merge(local, adapter_dir, out, dtype=_DTYPES.get(wanted))
    config_file = out / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if wanted in _DTYPES:
        config["dtype"] = str(_DTYPES[wanted]).removeprefix("torch.")
        config.pop("torch_dtype", None)
    tokenizer = load_tokenizer(ModelConfig(**{**record, "name_or_path": str(local),
                                              "tokenizer": None if base else record.get("tokenizer")}))
    config.setdefault("pad_token_id", tokenizer.pad_token_id)
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(out)
    return MergeOutcome(out, True)
