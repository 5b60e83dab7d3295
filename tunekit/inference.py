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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from tunekit.adapters.hf.tasks import TASKS
from tunekit.generation import GenerationOptions, generate_text
from tunekit.models.config import ModelConfig

__all__ = ["Loaded", "classify", "load_adapted", "load_for_inference", "merge_adapter", "predict"]

_PEFT_TASKS = {spec.peft_task_type: task for task, spec in TASKS.items()}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Loaded:
    """A model ready for prediction."""

    model: nn.Module
    tokenizer: Any
    task: str
    """"causal_lm" | "seq_cls" | "seq2seq"."""
    data: dict[str, Any] | None = None
    """The training run's ``data:`` section (format, templates), when recorded."""
    _renderer: Any = field(default=None, init=False, repr=False)

    def _prompts(self):
        """The run's ``PromptRenderer`` (None without a recorded data section)."""
        if self._renderer is None and self.data:
            from tunekit.data import DataConfig, PromptRenderer

            try:
                cfg = DataConfig.model_validate(self.data)
            except ValueError as err:
                raise ValueError(f"the adapter's recorded data section is not a valid data config: {err}") from None
            self._renderer = PromptRenderer(cfg, self.tokenizer, inference=True)
        return self._renderer

    def use_chat_template(self, template: str | None) -> None:
        """Prompt a plain model (no recorded run) through a chat template: a name, a ``.jinja`` file,
        Jinja text, or None for the tokenizer's own."""
        self.data = {"train_files": ["-"], "format": "chat", "chat_template": template}
        self._renderer = None

    def prompt_ids(self, prompt: str | dict, second: str | None = None, raw: bool = False,
                   system: str | None = None) -> list[int]:
        """The token ids the model is given for ``prompt``: those training built for the same prompt.

        Args:
            prompt: the user's text (an instruction, a user message, a text to classify...), or a
                row of the training format (``{"instruction": ..., "input": ...}``, ``{"messages": [...]}``).
            second: an instruction's input, or a classification pair's second text.
            raw: tokenize the text as is (the tokenizer's special tokens, no template).
            system: a system prompt replacing the run's (chat and instruction runs).
        """
        prompts = None if raw else self._prompts()
        if prompts is None:
            if not isinstance(prompt, str) or system is not None:
                raise ValueError("a prompt given as a row, or a system prompt, needs the run's data config (an "
                                 "adapter saved by tunekit finetune, or --chat-template) and no --raw")
            return list(self.tokenizer(prompt, second)["input_ids"])
        from tunekit.data.chat import SkipRow

        try:
            return prompts.prompt_ids(prompts.row_for(prompt, second, system))[0]
        except SkipRow as skip:
            raise ValueError(f"prompt {prompt!r} does not fit data.format {prompts.cfg.format!r}: "
                             f"{skip.args[0]}") from None

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation so far plus the generation prompt, with the run's chat template.

        Raises:
            ValueError: the run has no chat template (not a chat run, and none given).
        """
        from tunekit.data.chat import SkipRow

        prompts = self._prompts()
        if prompts is None or prompts.chat is None:
            raise ValueError("this model has no chat template from its run: pass --chat-template NAME (chatml, "
                             "llama3, ...), a .jinja file, or 'tokenizer' for the tokenizer's own")
        try:
            return prompts.chat.generation_ids(messages)
        except SkipRow as skip:
            raise ValueError(f"the chat template rejects the conversation: {skip.args[0]}") from None

    def end_of_turn(self) -> str | None:
        """The text the run's chat template closes a reply with (None without a chat template)."""
        from tunekit.data.chat import SkipRow

        prompts = self._prompts()
        if prompts is None or prompts.chat is None:
            return None
        try:
            return prompts.chat.end_of_turn()
        except SkipRow:
            return None

    @property
    def system(self) -> str | None:
        """The run's default system prompt (``data.system``)."""
        return (self.data or {}).get("system")

    def stop_ids(self) -> list[int] | None:
        """End-of-sequence ids for generation: the model's own and those training ended responses with."""
        own = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids = {*([] if own is None else [own] if isinstance(own, int) else own)}
        prompts = self._prompts()
        ids.update(prompts.end_ids() if prompts is not None else [])
        return sorted(ids) or None


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _base_info(adapter_dir: Path, base: str | None) -> tuple[ModelConfig, str, list[str] | None, dict | None]:
    """(model config, task, label names, data section) of the base an adapter folder was trained on."""
    from tunekit.adapter_check import anchored
    from tunekit.api import BASE_INFO_NAME

    if not (adapter_dir / "adapter_config.json").is_file():
        raise ValueError(f"{adapter_dir} is not an adapter folder (no adapter_config.json); "
                         "pass the run's adapter/ folder")
    record_file, peft_file = adapter_dir / BASE_INFO_NAME, adapter_dir / "adapter_config.json"
    if record_file.is_file():
        record = _read_json(record_file)
        fields, task, labels, data = record["model"], record["task"], record.get("label_names"), record.get("data")
    else:
        saved = _read_json(peft_file)
        task = _PEFT_TASKS.get(saved.get("task_type") or "CAUSAL_LM")
        if task is None or task == "seq_cls":
            raise ValueError(f"{adapter_dir}: task_type {saved.get('task_type')!r} needs the label names and head "
                             f"that {BASE_INFO_NAME} records; use an adapter saved by tunekit finetune")
        fields, labels, data = {"name_or_path": saved.get("base_model_name_or_path")}, None, None
    fields = {**fields, **{k: anchored(fields.get(k), adapter_dir) for k in ("name_or_path", "tokenizer") if k in fields}}
    if base is not None:
        fields = {**fields, "name_or_path": base, "tokenizer": None}
    source = fields.get("name_or_path")
    if not source:
        raise ValueError(f"{adapter_dir} does not record its base model; pass --base MODEL")
    if base is None and Path(source).is_absolute() and not Path(source).exists():
        raise ValueError(f"{adapter_dir} records its base model at {source}, which does not exist (was the run "
                         "folder moved, or the base deleted?); pass --base MODEL")
    if base is None and _has_tokenizer(adapter_dir):  # saved by finetune, with the run's chat template
        fields = {**fields, "tokenizer": str(adapter_dir)}
    return ModelConfig(**fields), task, labels, data


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file()


def load_adapted(adapter_dir: str | Path, base: str | None = None, *, dtype: str | None = None) -> Loaded:
    """The base, loaded as it was trained (dtype, 4-bit quantization), with the saved adapter active.

    Args:
        adapter_dir: folder with ``adapter_config.json`` + ``adapter_model.safetensors``.
        base: base model source replacing the recorded one.
        dtype: dtype replacing the recorded one ("fp32", "bf16", "fp16").
    """
    from tunekit.adapters import load_adapters
    from tunekit.models import load_model

    folder = Path(adapter_dir)
    model_cfg, task, labels, data = _base_info(folder, base)
    if dtype is not None:
        model_cfg = model_cfg.model_copy(update={"dtype": dtype})
    with _quiet_new_head(task):
        model, tokenizer = load_model(model_cfg, task=task, label_names=labels)
    load_adapters(model, folder)
    return Loaded(model.eval(), tokenizer, task, data)


@contextmanager
def _quiet_new_head(task: str):
    """transformers reports a classifier's head as "newly initialized ... consider training" when it loads
    the base; the adapter's trained head replaces it right after, so the report is wrong here."""
    if task != "seq_cls":
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
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
def classify(loaded: Loaded, ids: list[list[int]], batch_size: int = 16) -> torch.Tensor:
    """(N, num_labels) logits of a classifier for prompts given as token ids, in batches.

    Batches are padded as training batched them (``tunekit.data.collate``: left for decoder
    classifiers), so a prompt's logits do not depend on the batch it lands in.
    """
    from tunekit.data import collator_for

    collate = collator_for("seq_cls", loaded.tokenizer)
    out = []
    for start in range(0, len(ids), batch_size):
        rows = [{"input_ids": row, "attention_mask": [1] * len(row)} for row in ids[start: start + batch_size]]
        batch = {k: v.to(loaded.model.device) for k, v in collate(rows).items()}
        out.append(loaded.model(**batch).logits.float().cpu())
    return torch.cat(out)


def predict(source: str | Loaded, prompts: list[str | dict], base: str | None = None, max_new_tokens: int = 64,
            sample: bool = False, raw: bool = False, batch_size: int = 16, inputs: list[str] | None = None, *,
            system: str | None = None, options: GenerationOptions | None = None, stream: IO[str] | None = None,
            chat_template: str | None = None) -> list[str]:
    """One output per prompt: the predicted label (classifiers) or the generated continuation.

    Each prompt becomes the token ids training built for the same prompt (``Loaded.prompt_ids``:
    the run's instruction or chat template, its system prompt or ``system``, the tokenizer's special
    tokens as training added them), unless ``raw``; ``inputs`` gives each prompt its instruction input
    or second text of a pair. Classifiers run in batches of ``batch_size``; generation
    (``tunekit.generation``: ``options`` replace ``max_new_tokens`` / ``sample``) stops at the model's
    EOS, the end tokens training closed responses with, the chat template's end of turn or a stop
    string, and is written to ``stream`` as it is produced when one is given.

    Args:
        source: an adapter folder, a model (folder, Hub id, ``pkg:``), or an already ``Loaded`` model.
        chat_template: prompt a plain model through this chat template (name, file, Jinja, "tokenizer").
    """
    if inputs is not None and len(inputs) != len(prompts):
        raise ValueError(f"{len(inputs)} inputs for {len(prompts)} prompts: give one input per prompt")
    loaded = source if isinstance(source, Loaded) else load_for_inference(source, base)
    if chat_template is not None:
        loaded.use_chat_template(None if chat_template == "tokenizer" else chat_template)
    options = options or GenerationOptions(max_new_tokens=max_new_tokens, sample=sample)
    seconds = inputs if inputs is not None else [None] * len(prompts)
    ids = [loaded.prompt_ids(prompt, second, raw=raw, system=system) for prompt, second in zip(prompts, seconds)]
    if loaded.task == "seq_cls":
        labels = [str(loaded.model.config.id2label[int(i)]) for i in classify(loaded, ids, batch_size).argmax(-1)]
        for label in labels if stream is not None else []:
            stream.write(label + "\n")
        return labels
    return [generate_text(loaded, row, options, stream=stream) for row in ids]


def _dequantize_all(model: nn.Module) -> None:
    """Replace every remaining bitsandbytes layer by a plain fp32 ``nn.Linear`` and drop the model's
    quantization config, so ``save_pretrained`` writes a model that loads without bitsandbytes."""
    from tunekit.adapters.hf.layers import dequantized_linear, is_quantized

    for name, module in list(model.named_modules()):
        if is_quantized(module):
            model.set_submodule(name, dequantized_linear(module))
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def merge_adapter(adapter_dir: str | Path, out: str | Path, base: str | None = None,
                  dtype: str | None = None) -> Path:
    """Merge the adapter into its base and ``save_pretrained`` model + tokenizer to ``out``.

    The base is loaded as it was trained. A QLoRA adapter is merged into the dequantized 4-bit
    weights it was trained against (``eject_adapters`` dequantizes), not the checkpoint's original
    full-precision weights, and the base's other 4-bit layers are dequantized too, so the merged
    model computes what the trained 4-bit model computed.

    Args:
        dtype: of the merged model ("fp32", "bf16", "fp16"); default the training dtype, fp32 for a
            quantized base.
    """
    from tunekit.adapters import eject_adapters

    folder = Path(adapter_dir)
    quantized = _base_info(folder, base)[0].quantization is not None
    loaded = load_adapted(folder, base, dtype=None if quantized else dtype)
    merged = eject_adapters(loaded.model, merge=True)
    if quantized:
        _dequantize_all(merged)
        merged.to(_DTYPES[dtype or "fp32"])
    out = Path(out)
    merged.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out
