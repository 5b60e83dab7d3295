"""Merging an adapter into a base on disk, one safetensors shard at a time (never the whole model in memory).

    for each shard of the base (model.safetensors, or the shards its index names):
        read the shard  ->  merge_state_dict (fp32, module by module, on the CPU)  ->  write the shard
    copy the index (same shard names, same weight map) and every non-weight file (config, tokenizer)

Peak memory is about one shard (plus its merged tensors), whatever the model's
size, so a model trained sharded over several GPUs merges on one CPU host. The
result equals ``eject_adapters(model, merge=True).save_pretrained(...)`` of the
same base and adapter. Written into a temporary folder and renamed at the end.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass(frozen=True)
class MergeReport:
    out_dir: Path
    shards: int
    largest_shard_bytes: int
    """The most weight bytes held at once (one shard's tensors)."""


def base_shards(base_dir: Path) -> list[str]:
    """File names of the base's safetensors shards, in index order.

    Raises:
        FileNotFoundError: neither ``model.safetensors`` nor an index is there.
    """
    if (base_dir / INDEX).is_file():
        weight_map = json.loads((base_dir / INDEX).read_text(encoding="utf-8"))["weight_map"]
        return list(dict.fromkeys(weight_map.values()))
    if (base_dir / SINGLE).is_file():
        return [SINGLE]
    raise FileNotFoundError(f"{base_dir} holds no {SINGLE} or {INDEX}: point at a transformers model folder "
                            "saved with safetensors (the unquantized base)")


def stream_merge(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                 dtype: torch.dtype | None = None) -> MergeReport:
    """Write ``base_dir`` with the LoRA / DoRA adapter of ``adapter_dir`` merged in to ``out_dir``, shard by shard.

    ``dtype``: the floating-point weights are first cast to it (the merge itself runs in fp32),
    as loading the base in that dtype would; None keeps the files' dtypes.

    Raises:
        ValueError: not a mergeable adapter, a mis-shaped or non-finite one, or adapter tensors
            that matched no weight of the base (another model).
    """
    from tunekit.adapters import read_adapter_config
    from tunekit.adapters.serialization import CONFIG_NAME, WEIGHTS_NAME
    from tunekit.adapters.state_merge import merge_state_dict

    base, adapter, out = Path(base_dir), Path(adapter_dir), Path(out_dir)
    _, cfg = read_adapter_config(adapter)
    fan_in_fan_out = bool(json.loads((adapter / CONFIG_NAME).read_text(encoding="utf-8")).get("fan_in_fan_out"))
    adapter_state = load_file(str(adapter / WEIGHTS_NAME))
    shards = base_shards(base)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    used: set[str] = set()
    largest = 0
    for name in shards:
        with safe_open(str(base / name), framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        largest = max(largest, sum(t.numel() * t.element_size() for t in state.values()))
        merged = merge_state_dict(state, adapter_state, cfg, fan_in_fan_out=fan_in_fan_out)
        save_file(merged.state, str(tmp / name), metadata=metadata)
        used |= merged.used
        del state, merged
    unused = sorted(set(adapter_state) - used)
    if unused:
        shutil.rmtree(tmp)
        raise ValueError(f"adapter tensor {unused[0]!r} (and {len(unused) - 1} more) matched no weight of {base}: "
                         "merge into the base the adapter was trained on")
    for item in base.iterdir():  # config, generation config, tokenizer, the index
        if item.is_file() and item.name not in shards:
            shutil.copy2(item, tmp / item.name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return MergeReport(out, len(shards), largest)
