"""The adapter validity gate: saved tensors against what the adapter config and base model config imply.

    expected = expected_adapter_shapes(model_config, adapter_cfg, task="causal_lm")
    check_adapter_tensors(state, expected, where="out/adapter_model.safetensors")

The expected key names and shapes come from the adapter method itself: the
base architecture is built on the meta device from its config (no weights, no
memory, so a 70B config costs nothing), the adapter is injected, and the
method's own export (``adapter_state_dict``) lists what a save writes. The
check then requires every expected tensor, nothing extra, equal shapes, a
floating dtype and finite values, and names the first offending key.

It needs only a state dict, the adapter config and the base model's config,
so it runs the same way before a Hub push (``tunekit.hub``) and in a trainer
before writing an adapter gathered from several processes.

Example:
    >>> from transformers import LlamaConfig
    >>> from tunekit.adapters import LoRAConfig
    >>> config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    ...                      num_attention_heads=4, num_key_value_heads=2)
    >>> shapes = expected_adapter_shapes(config, LoRAConfig(rank=4), task="causal_lm")
    >>> shapes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    (4, 32)
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["AdapterCheckError", "anchored", "check_adapter_folder", "check_adapter_state", "check_adapter_tensors",
           "expected_adapter_shapes", "recorded_base"]


class AdapterCheckError(ValueError):
    """A saved adapter that does not fit its config and base model (one line naming the tensor)."""


def _shape_only(adapter_cfg):
    # Shapes never depend on how the weights start, and some inits need real
    # base weights or a tokenizer (prompt init from text): build with the default.
    field = type(adapter_cfg).model_fields.get("init")
    if field is None or adapter_cfg.init == field.default:
        return adapter_cfg
    return adapter_cfg.model_copy(update={"init": field.default})


def expected_adapter_shapes(model_config, adapter_cfg, *, task: str = "causal_lm",
                            label_names: list[str] | None = None,
                            trust_remote_code: bool = False) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor a save of ``adapter_cfg`` on this base writes.

    Args:
        model_config: the base model's ``PretrainedConfig``.
        adapter_cfg: the adapter's config (a ``tunekit.adapters`` config, e.g. from ``read_adapter_config``).
        task: the head the adapter was trained with ("causal_lm", "seq_cls", "seq2seq").
        label_names: classification labels (they size a trained head in ``modules_to_save``).
        trust_remote_code: allow a config whose model code ships with the checkpoint.
    """
    import transformers

    from tunekit.adapters import adapter_state_dict, inject_adapters
    from tunekit.models.loading import TASKS

    if task not in TASKS:
        raise AdapterCheckError(f"task {task!r} is not one of {sorted(TASKS)}")
    config = copy.deepcopy(model_config)
    if task == "seq_cls" and label_names:
        config.num_labels = len(label_names)
    with torch.device("meta"):
        model = getattr(transformers, TASKS[task].auto_class).from_config(config, trust_remote_code=trust_remote_code)
    inject_adapters(model, _shape_only(adapter_cfg))
    return {key: tuple(value.shape) for key, value in adapter_state_dict(model).items()}


def check_adapter_tensors(tensors: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], *,
                          where: str = "adapter") -> None:
    """Raise ``AdapterCheckError`` unless ``tensors`` has exactly the ``expected`` keys and shapes, all finite."""
    missing = [key for key in expected if key not in tensors]
    if missing:
        raise AdapterCheckError(f"{where}: {len(missing)} of {len(expected)} expected tensors are missing, "
                                f"e.g. {missing[0]!r}; the save is incomplete")
    extra = [key for key in tensors if key not in expected]
    if extra:
        raise AdapterCheckError(f"{where}: {len(extra)} tensors the adapter config does not describe, e.g. "
                                f"{extra[0]!r}; was it saved from another config or base model?")
    for key, shape in expected.items():
        tensor = tensors[key]
        if tuple(tensor.shape) != tuple(shape):
            raise AdapterCheckError(f"{where}: {key!r} has shape {tuple(tensor.shape)}, but the adapter config "
                                    f"and base model config give {tuple(shape)}")
        if not tensor.is_floating_point():
            raise AdapterCheckError(f"{where}: {key!r} has dtype {tensor.dtype}; adapter weights are floating point")
        if not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise AdapterCheckError(f"{where}: {key!r} holds {bad} NaN/Inf values; the training diverged "
                                    "(lower train.lr or use train.max_grad_norm)")


def check_adapter_state(state: Mapping[str, torch.Tensor], adapter_cfg, model_config, *, task: str = "causal_lm",
                        label_names: list[str] | None = None, where: str = "adapter") -> None:
    """The whole gate in one call: ``state`` (adapter_state_dict keys) against config + base model config."""
    expected = expected_adapter_shapes(model_config, adapter_cfg, task=task, label_names=label_names)
    check_adapter_tensors(state, expected, where=where)


_PEFT_TASKS = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "seq_cls", "SEQ_2_SEQ_LM": "seq2seq"}


def anchored(value: Any, folder: str | Path) -> Any:
    """A recorded path relative to the adapter folder (``../base``: a run folder can move) made absolute;
    anything else (a Hub id, ``pkg:``, an absolute path, None) as it is."""
    if isinstance(value, str) and value.startswith(("./", "../")):
        return str((Path(folder) / value).resolve())
    return value


def recorded_base(folder: str | Path) -> tuple[str, list[str] | None, dict[str, Any]]:
    """(task, label names, model record) of an adapter folder: ``tunekit_base.json``, else PEFT's config.

    Paths the record holds relative to the folder come back absolute (``anchored``)."""
    folder = Path(folder)
    record_file = folder / "tunekit_base.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text(encoding="utf-8"))
        model = dict(record["model"])
        model.update({k: anchored(model.get(k), folder) for k in ("name_or_path", "tokenizer") if k in model})
        return record["task"], record.get("label_names"), model
    saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    task = _PEFT_TASKS.get(saved.get("task_type") or "CAUSAL_LM", "causal_lm")
    return task, None, {"name_or_path": anchored(saved.get("base_model_name_or_path"), folder)}


def check_adapter_folder(folder: str | Path, model_config=None):
    """Check a saved adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``); return its config.

    ``model_config`` is the base's ``PretrainedConfig``; by default it is read
    from the base the folder records (``tunekit_base.json`` or PEFT's
    ``base_model_name_or_path``: a local folder, ``pkg:``, or a cached Hub id).
    """
    from safetensors.torch import load_file

    from tunekit.adapters import read_adapter_config

    folder = Path(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise AdapterCheckError(f"{folder}: no adapter_model.safetensors; the adapter was not saved completely")
    _, adapter_cfg = read_adapter_config(folder)
    task, labels, model_record = recorded_base(folder)
    if model_config is None:
        model_config = _recorded_config(folder, model_record)
    overrides = model_record.get("config_overrides") or {}
    if overrides:  # the run changed these fields of the base config before building the model
        model_config = copy.deepcopy(model_config)
        for key, value in overrides.items():
            setattr(model_config, key, value)
    check_adapter_state(load_file(str(weights)), adapter_cfg, model_config, task=task, label_names=labels,
                        where=str(weights))
    return adapter_cfg


def _recorded_config(folder: Path, model_record: dict[str, Any]):
    from transformers import AutoConfig

    from tunekit.models import resolve_source

    source = model_record.get("name_or_path")
    if not source:
        raise AdapterCheckError(f"{folder} does not record its base model; pass the base model config")
    try:
        return AutoConfig.from_pretrained(resolve_source(source), revision=model_record.get("revision"),
                                          trust_remote_code=bool(model_record.get("trust_remote_code")))
    except OSError as err:
        raise AdapterCheckError(f"{folder}: cannot read the base model config of {source!r} to check the adapter "
                                f"({str(err).splitlines()[0]})") from None
