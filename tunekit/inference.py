"""Use what a run saved: load a base + adapter, predict, merge (``tunekit generate`` / ``merge``).

An adapter folder names its base in ``tunekit_base.json`` (written by
``finetune``: model source, dtype, task head, label names) or, for folders
written by PEFT, in ``adapter_config.json`` (``base_model_name_or_path``,
``task_type``). ``base=`` replaces the recorded source.

Example:
    >>> from tunekit.inference import predict
    >>> predict("runs/quickstart/adapter", ["the striker scored twice"])  # doctest: +SKIP
    ['sports']
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunekit.adapters.hf.tasks import TASKS
from tunekit.models.config import ModelConfig

__all__ = ["Loaded", "load_adapted", "load_for_inference", "merge_adapter", "predict"]

_PEFT_TASKS = {spec.peft_task_type: task for task, spec in TASKS.items()}


@dataclass
class Loaded:
    """A model ready for prediction."""

    model: nn.Module
    tokenizer: Any
    task: str
    """"causal_lm" | "seq_cls" | "seq2seq"."""
    data: dict[str, Any] | None = None
    """The training run's ``data:`` section (prompt templates), when recorded."""

    def render(self, prompt: str) -> str:
        """``prompt`` in the form training showed the model (instruction template, chat template)."""
        fmt = (self.data or {}).get("format")
        if fmt == "instruction":
            return self.data["prompt_template_no_input"].format(prompt=prompt)
        if fmt == "chat":
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                      add_generation_prompt=True,
                                                      chat_template=self.data.get("chat_template"))
        return prompt


def _base_info(adapter_dir: Path, base: str | None) -> tuple[ModelConfig, str, list[str] | None, dict | None]:
    """(model config, task, label names, data section) of the base an adapter folder was trained on."""
    from tunekit.api import BASE_INFO_NAME

    record_file, peft_file = adapter_dir / BASE_INFO_NAME, adapter_dir / "adapter_config.json"
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        fields, task, labels, data = record["model"], record["task"], record.get("label_names"), record.get("data")
    else:
        saved = json.loads(peft_file.read_text())
        task = _PEFT_TASKS.get(saved.get("task_type") or "CAUSAL_LM")
        if task is None or task == "seq_cls":
            raise ValueError(f"{adapter_dir}: task_type {saved.get('task_type')!r} needs the label names and head "
                             f"that {BASE_INFO_NAME} records; use an adapter saved by tunekit finetune")
        fields, labels, data = {"name_or_path": saved.get("base_model_name_or_path")}, None, None
    if base is not None:
        fields = {**fields, "name_or_path": base, "tokenizer": None}
    if not fields.get("name_or_path"):
        raise ValueError(f"{adapter_dir} does not record its base model; pass --base MODEL")
    return ModelConfig(**fields), task, labels, data


def load_adapted(adapter_dir: str | Path, base: str | None = None, *, merge_ready: bool = False,
                 dtype: str | None = None) -> Loaded:
    """The base with the saved adapter loaded and active.

    Args:
        adapter_dir: folder with ``adapter_config.json`` + ``adapter_model.safetensors``.
        base: base model source replacing the recorded one.
        merge_ready: load the base unquantized (merging needs real weights).
        dtype: dtype replacing the recorded one ("fp32", "bf16", "fp16").
    """
    from tunekit.adapters import load_adapters
    from tunekit.models import load_model

    folder = Path(adapter_dir)
    if not (folder / "adapter_config.json").is_file():
        raise ValueError(f"{folder} is not an adapter folder (no adapter_config.json); pass the run's adapter/ folder")
    model_cfg, task, labels, data = _base_info(folder, base)
    updates: dict[str, Any] = {"quantization": None} if merge_ready else {}
    if dtype is not None:
        updates["dtype"] = dtype
    elif merge_ready and model_cfg.quantization is not None:
        updates["dtype"] = "fp32"
    model, tokenizer = load_model(model_cfg.model_copy(update=updates), task=task, label_names=labels)
    load_adapters(model, folder)
    return Loaded(model.eval(), tokenizer, task, data)


def load_for_inference(source: str, base: str | None = None) -> Loaded:
    """An adapter folder (base + adapter) or a plain model (Hub id, folder, pkg:) ready to predict."""
    from transformers import AutoConfig

    from tunekit.models import load_model, resolve_source

    if (Path(source) / "adapter_config.json").is_file():
        return load_adapted(source, base)
    path = resolve_source(source, key="MODEL_OR_ADAPTER")
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:  # not a local folder, and not loadable as a Hub id either
        reason = " ".join(str(err).split())[:200]
        raise ValueError(f"{source!r} is neither an adapter folder (adapter_config.json), a model folder, "
                         f"nor a loadable Hub id ({reason})") from err
    if any(arch.endswith("ForSequenceClassification") for arch in config.architectures or []):
        task = "seq_cls"
    else:
        task = "seq2seq" if config.is_encoder_decoder else "causal_lm"
    labels = [config.id2label[i] for i in range(config.num_labels)] if task == "seq_cls" else None
    model, tokenizer = load_model(ModelConfig(name_or_path=source), task=task, label_names=labels)
    return Loaded(model.eval(), tokenizer, task)


@torch.no_grad()
def predict(source: str, prompts: list[str], base: str | None = None, max_new_tokens: int = 64,
            sample: bool = False, raw: bool = False) -> list[str]:
    """One output per prompt: the predicted label (classifiers) or the generated continuation.

    Prompts go through the training run's instruction/chat template unless ``raw``.
    """
    loaded = load_for_inference(source, base)
    model, tokenizer, task = loaded.model, loaded.tokenizer, loaded.task
    outputs = []
    for prompt in prompts:
        text = prompt if raw else loaded.render(prompt)
        # Single texts: type ids would be all zeros (BERT's default); decoders reject them.
        inputs = tokenizer(text, return_tensors="pt", return_token_type_ids=False).to(model.device)
        if task == "seq_cls":
            label_id = int(model(**inputs).logits[0].argmax())
            outputs.append(str(model.config.id2label[label_id]))
            continue
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sample,
                                   pad_token_id=tokenizer.pad_token_id)
        new = generated[0] if task == "seq2seq" else generated[0, inputs["input_ids"].shape[1]:]
        outputs.append(tokenizer.decode(new, skip_special_tokens=True))
    return outputs


def merge_adapter(adapter_dir: str | Path, out: str | Path, base: str | None = None,
                  dtype: str | None = None) -> Path:
    """Merge the adapter into its (unquantized) base and ``save_pretrained`` model + tokenizer to ``out``."""
    from tunekit.adapters import eject_adapters

    loaded = load_adapted(adapter_dir, base, merge_ready=True, dtype=dtype)
    merged = eject_adapters(loaded.model, merge=True)
    out = Path(out)
    merged.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out
