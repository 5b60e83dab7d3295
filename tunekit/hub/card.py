"""The model card (README.md) of a push, built with ``huggingface_hub.ModelCard`` / ``ModelCardData``.

Metadata: ``library_name`` (peft for PEFT-format adapters, transformers for
models, tunekit for methods PEFT cannot load), ``base_model`` (a Hub id only),
``tags`` (the method, ``tunekit``, ``base_model:adapter:<id>`` as PEFT writes),
``pipeline_tag`` from the task, ``datasets`` when they are Hub ids, ``license``
copied from the base when it is known (never invented) and the evaluation
results as ``model-index``. Body: snippets that load the repo (tunekit, PEFT,
transformers), the method and hyper-parameters, the data, metrics before and
after, hardware and training time, the loss curve.

tunekit's part of the body sits between two HTML comments, so a later push
replaces it and keeps whatever the owner wrote around it; metadata keys
tunekit does not set are kept too (``overwrite=True`` replaces the card).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CardSpec", "RunFacts", "adapter_spec", "build_card", "local_card", "merge_cards", "merged_record",
           "merged_spec", "method_tag", "run_facts"]

START, END = "<!-- tunekit:start -->", "<!-- tunekit:end -->"
PIPELINE_TAGS = {"causal_lm": "text-generation", "seq_cls": "text-classification",
                 "seq2seq": "text2text-generation"}
AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "seq_cls": "AutoModelForSequenceClassification",
                "seq2seq": "AutoModelForSeq2SeqLM"}
_TRAIN_KEYS = ("epochs", "max_steps", "batch_size", "grad_accum_steps", "lr", "optimizer", "scheduler",
               "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm", "mixed_precision", "seed")
_DATA_KEYS = ("format", "max_seq_len", "packing", "mask_prompt", "labels")


@dataclass
class RunFacts:
    """What the run folder (and the live run, when pushing from ``finetune``) tells about training."""

    config: dict[str, Any] | None = None
    """``resolved_config.yaml`` as a mapping."""
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    train_stats: dict[str, Any] | None = None
    """steps, train_seconds, tokens_per_second, peak_memory_mib, hardware (what is known)."""
    metrics_file: Path | None = None


def _train_stats_from_checkpoint(run: Path) -> dict[str, Any] | None:
    progress_files = sorted((run / "checkpoints").glob("step-*/progress.json"),
                            key=lambda p: int(p.parent.name.split("-")[1]))
    if not progress_files:
        return None
    progress = json.loads(progress_files[-1].read_text(encoding="utf-8"))
    seconds = float(progress.get("train_seconds") or 0)
    return {"steps": progress.get("global_step"), "train_seconds": seconds,
            "tokens_per_second": progress.get("tokens", 0) / seconds if seconds else None}


def run_facts(run: Path | None, train_stats: dict[str, Any] | None = None) -> RunFacts:
    """Gather the facts of a run folder (``None``: a bare adapter or model folder, nothing known)."""
    import yaml

    if run is None:
        return RunFacts(train_stats=train_stats)
    facts = RunFacts(train_stats=train_stats or _train_stats_from_checkpoint(run))
    config_file, results_file, metrics = run / "resolved_config.yaml", run / "results.json", run / "metrics.jsonl"
    if config_file.is_file():
        facts.config = yaml.safe_load(config_file.read_text(encoding="utf-8"))
    if results_file.is_file():
        results = json.loads(results_file.read_text(encoding="utf-8"))
        facts.before, facts.after = results.get("before"), results.get("after")
    facts.metrics_file = metrics if metrics.is_file() else None
    return facts


@dataclass
class CardSpec:
    """Everything the card says, decided by the push."""

    repo_id: str
    kind: str
    """"adapter", "merged" or "base"."""
    base_model: str | None
    task: str | None
    method_tag: str | None
    """lora / dora / qlora / prefix-tuning / prompt-tuning / adapter (adapters and merged models)."""
    adapter: dict[str, Any] | None
    """The adapter's config fields."""
    peft_format: bool
    revision: str = "main"
    label_names: list[str] | None = None
    license: str | None = None
    image: str | None = None
    """File name of the loss-curve PNG in the repo, when one is pushed."""
    facts: RunFacts = field(default_factory=RunFacts)
    endpoint: str = "https://huggingface.co"
    """The Hub the card links to."""
    local: bool = False
    """A card written into the run folder: ``repo_id`` is the folder's path, loaded from disk."""
    local_base: str | None = None
    """The base as the run recorded it, when it has no Hub id (a local folder, ``pkg:``)."""


def method_tag(adapter: dict[str, Any], model: dict[str, Any]) -> str:
    """The card's method tag: lora, dora, qlora, prefix-tuning, prompt-tuning, adapter."""
    method = adapter.get("method")
    if method == "lora":
        if adapter.get("use_dora"):
            return "dora"
        return "qlora" if (model.get("quantization") or {}).get("bits") == 4 else "lora"
    return {"prefix": "prefix-tuning", "prompt": "prompt-tuning", "bottleneck": "adapter"}.get(method, method)


def adapter_spec(folder: Path, run: Path | None, repo_id: str, base_model: str | None, *, revision: str = "main",
                 train_stats: dict | None = None, license: str | None = None, **extra) -> CardSpec:
    """The card of an adapter folder whose files name ``base_model`` (the push's and the run folder's)."""
    from tunekit.adapter_check import recorded_base
    from tunekit.adapters import read_adapter_config
    from tunekit.hub.manifest import public_json

    task, labels, model = recorded_base(folder)
    method, adapter_cfg = read_adapter_config(folder)
    adapter = public_json(adapter_cfg.model_dump(mode="json"), base_model)  # the card shows it: no local paths
    return CardSpec(repo_id=repo_id, kind="adapter", base_model=base_model, task=task,
                    method_tag=method_tag(adapter, model), adapter=adapter, peft_format=method.peft_type is not None,
                    revision=revision, label_names=labels, license=license, facts=run_facts(run, train_stats), **extra)


def merged_record(run: Path | None) -> tuple[str | None, dict | None, dict | None]:
    """(task, model record, public adapter config) of the adapter a run's merged model came from."""
    from tunekit.hub.manifest import BASE_INFO_NAME

    record_dir = run / "adapter" if run is not None else None
    if record_dir is None or not (record_dir / BASE_INFO_NAME).is_file():
        return None, None, None
    from tunekit.adapters import read_adapter_config

    record = json.loads((record_dir / BASE_INFO_NAME).read_text(encoding="utf-8"))
    return record.get("task"), record["model"], read_adapter_config(record_dir)[1].model_dump(mode="json")


def merged_spec(run: Path | None, repo_id: str, base_model: str | None, task: str, *, revision: str = "main",
                train_stats: dict | None = None, license: str | None = None, **extra) -> CardSpec:
    """The card of a run's merged model (the push's and the run folder's)."""
    from tunekit.hub.manifest import public_json

    _, model, adapter = merged_record(run)
    adapter = public_json(adapter, base_model) if adapter else None
    return CardSpec(repo_id=repo_id, kind="merged", base_model=base_model, task=task,
                    method_tag=method_tag(adapter, model or {}) if adapter else None, adapter=adapter,
                    peft_format=False, revision=revision, license=license, facts=run_facts(run, train_stats), **extra)


def _datasets(facts: RunFacts) -> list[str] | None:
    from tunekit.hub.manifest import hub_id_or_none

    dataset = ((facts.config or {}).get("data") or {}).get("dataset")
    return [dataset] if hub_id_or_none(dataset) else None


def _eval_results(spec: CardSpec):
    from huggingface_hub import EvalResult

    after = spec.facts.after or {}
    if not (after and spec.task in PIPELINE_TAGS):
        return None
    datasets = _datasets(spec.facts)
    dataset_name = datasets[0] if datasets else "held-out evaluation rows"
    return [EvalResult(task_type=PIPELINE_TAGS[spec.task], dataset_type=datasets[0] if datasets else "custom",
                       dataset_name=dataset_name, metric_type=key, metric_value=round(float(value), 6))
            for key, value in after.items() if key in ("loss", "accuracy", "perplexity")] or None


def card_data(spec: CardSpec):
    """The card's metadata as ``ModelCardData``."""
    from huggingface_hub import ModelCardData

    library = "transformers" if spec.kind != "adapter" else ("peft" if spec.peft_format else "tunekit")
    tags = [t for t in (spec.method_tag, "tunekit") if t]
    if spec.kind == "adapter" and spec.base_model:
        tags.append(f"base_model:adapter:{spec.base_model}")
    return ModelCardData(library_name=library, base_model=spec.base_model, tags=tags,
                         pipeline_tag=PIPELINE_TAGS.get(spec.task or ""), datasets=_datasets(spec.facts),
                         license=spec.license, model_name=spec.repo_id, eval_results=_eval_results(spec))


def _rev(spec: CardSpec) -> str:
    return "" if spec.revision == "main" else f', revision="{spec.revision}"'


def _local_snippets(spec: CardSpec, auto: str) -> list[str]:
    if spec.kind != "adapter":
        return ["With transformers (the chat template, if the run had one, is in the tokenizer):", "", "```python",
                f"from transformers import {auto}, AutoTokenizer", "",
                f'model = {auto}.from_pretrained("{spec.repo_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{spec.repo_id}")', "```", ""]
    verb = "chat" if spec.task == "causal_lm" else "generate"
    return ["From the command line (prompts are built as in training):", "", "```bash",
            f'tunekit {verb} {spec.repo_id}' + (' --prompt "..."' if verb == "generate" else ""), "```", "",
            "From Python:", "", "```python", "from tunekit.inference import load_adapted, predict", "",
            f'loaded = load_adapted("{spec.repo_id}")  # base + adapter, as trained',
            'print(predict(loaded, ["..."]))', "```", ""]


def _snippets(spec: CardSpec) -> list[str]:
    auto = AUTO_CLASSES.get(spec.task or "causal_lm", "AutoModel")
    if spec.local:
        return _local_snippets(spec, auto)
    if spec.kind != "adapter":
        return ["With transformers:", "", "```python", f"from transformers import {auto}, AutoTokenizer", "",
                f'model = {auto}.from_pretrained("{spec.repo_id}"{_rev(spec)})',
                f'tokenizer = AutoTokenizer.from_pretrained("{spec.repo_id}"{_rev(spec)})', "```", ""]
    lines = ["With tunekit (`pip install tunekit`):", "", "```python",
             "from huggingface_hub import snapshot_download", "from tunekit.inference import load_adapted", "",
             f'loaded = load_adapted(snapshot_download("{spec.repo_id}"{_rev(spec)}))',
             "model, tokenizer = loaded.model, loaded.tokenizer", "```", ""]
    if spec.peft_format and spec.base_model:
        head = ""
        if spec.task == "seq_cls" and spec.label_names:
            labels = dict(enumerate(spec.label_names))
            # The trained head comes with the adapter; a head of another size in the base is replaced.
            head = f", num_labels={len(labels)}, id2label={labels!r}, ignore_mismatched_sizes=True"
        lines += ["With PEFT:", "", "```python", "from peft import PeftModel",
                  f"from transformers import {auto}, AutoTokenizer", "",
                  f'base = {auto}.from_pretrained("{spec.base_model}"{head})',
                  f'model = PeftModel.from_pretrained(base, "{spec.repo_id}"{_rev(spec)})',
                  f'tokenizer = AutoTokenizer.from_pretrained("{spec.base_model}")', "```", ""]
    return lines


def _table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("setting", "value")) -> list[str]:
    out = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    return out + [f"| {k} | {v} |" for k, v in rows]


def _training(spec: CardSpec) -> list[str]:
    lines = []
    if spec.adapter:
        rows = [(k, v) for k, v in spec.adapter.items() if v not in (None, [], {}) and k != "method"]
        lines += [f"### Method: {spec.method_tag or spec.adapter.get('method')}", "", *_table(rows), ""]
    config = spec.facts.config or {}
    train = config.get("train") or {}
    if train:
        lines += ["### Hyper-parameters", "", *_table([(k, train[k]) for k in _TRAIN_KEYS if k in train]), ""]
    data = config.get("data") or {}
    if data:
        source = data.get("dataset") or ", ".join(Path(f).name for f in data.get("train_files") or []) or "?"
        rows = [("source", source), *[(k, data[k]) for k in _DATA_KEYS if data.get(k) not in (None, [])]]
        lines += ["### Data", "", *_table(rows), ""]
    return lines


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("–" if value is None else str(value))


def _results(spec: CardSpec) -> list[str]:
    facts, lines = spec.facts, []
    if facts.after:
        keys = [k for k in facts.after if isinstance(facts.after[k], (int, float))]
        rows = [f"| {k} | {_fmt((facts.before or {}).get(k))} | {_fmt(facts.after[k])} |" for k in keys]
        lines += ["## Results", "", "| metric | before training | after training |", "|---|---|---|", *rows, ""]
    if spec.image:
        lines += ["## Training curve", "", f"![Training loss]({spec.image})", ""]
    stats = {k: v for k, v in (facts.train_stats or {}).items() if v is not None}
    if stats:
        shown = {"steps": "optimizer steps", "train_seconds": "training time (s)", "tokens_per_second": "tokens/s",
                 "peak_memory_mib": "peak memory (MiB)", "hardware": "hardware"}
        lines += ["## Hardware and time", "", *_table([(shown[k], _fmt(stats[k])) for k in shown if k in stats]), ""]
    return lines


_METHOD_NAMES = {"lora": "LoRA", "dora": "DoRA", "qlora": "QLoRA", "prefix-tuning": "prefix-tuning",
                 "prompt-tuning": "prompt-tuning", "adapter": "bottleneck"}


def _summary(spec: CardSpec) -> str:
    if spec.base_model:
        base = f"[{spec.base_model}]({spec.endpoint}/{spec.base_model})"
    else:
        base = f"the base model `{spec.local_base}`" if spec.local_base else "its base model"
    what = _METHOD_NAMES.get(spec.method_tag or "", spec.method_tag)
    if spec.kind == "adapter":
        return f"A {what or 'tunekit'} adapter for {base}, trained with tunekit."
    if spec.kind == "merged":
        adapter = f"a {what} adapter" if what else "an adapter"
        return f"{base} with {adapter} trained by tunekit merged into its weights: a plain transformers model."
    return "The base model the adapters of this project were trained on, as tunekit saved it."


def tunekit_section(spec: CardSpec) -> str:
    """The part of the card body tunekit owns (between the START and END markers)."""
    title = Path(spec.repo_id).parent.name if spec.local else spec.repo_id.split("/")[-1]
    lines = [START, f"# {title}", "", _summary(spec), "", "## Use it", "",
             *_snippets(spec)]
    if spec.kind != "base":
        lines += ["## Training", "", *_training(spec), *_results(spec)]
    return "\n".join(lines).rstrip() + "\n" + END


def build_card(spec: CardSpec):
    """The ``ModelCard`` of a push."""
    from huggingface_hub import ModelCard

    return ModelCard(f"---\n{card_data(spec).to_yaml()}\n---\n\n{tunekit_section(spec)}\n")


def merge_cards(new, remote_text: str | None, overwrite: bool = False):
    """``new`` merged into the card already on the Hub: its other metadata and text kept, tunekit's part replaced."""
    from huggingface_hub import ModelCard

    if overwrite or not remote_text or not remote_text.strip():
        return new
    old = ModelCard(remote_text, ignore_metadata_errors=True)
    meta = {**old.data.to_dict(), **{k: v for k, v in new.data.to_dict().items() if v is not None}}
    tags = list(dict.fromkeys([*(old.data.tags or []), *(new.data.tags or [])]))
    if tags:
        meta["tags"] = tags
    section = new.text.strip()
    body = old.text
    if START in body and END in body:
        body = body[:body.index(START)] + section + body[body.index(END) + len(END):]
    else:
        body = body.rstrip() + ("\n\n" if body.strip() else "") + section + "\n"
    from huggingface_hub import ModelCardData

    return ModelCard(f"---\n{ModelCardData(**meta).to_yaml()}\n---\n\n{body.lstrip()}")


def local_card(spec: CardSpec) -> str:
    """The README.md text of a run's ``adapter/`` or ``merged/`` folder: the card a push builds, for the
    folder on disk (``spec.local``)."""
    return str(build_card(spec))
